"""Check a backup folder: every file against its manifest row, and the files its index
names against the manifest. Reads only; needs no configuration and no engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.backup.copy import file_digest
from engine.backup.folder import INDEX, BackupFolder
from engine.backup.manifest import Manifest
from engine.errors import BackupError
from engine.progress import Progress


@dataclass(slots=True)
class Report:
    files: int = 0
    nbytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, folder: BackupFolder) -> dict[str, Any]:
        return {
            "backup": str(folder.root),
            "ok": self.ok,
            "files": self.files,
            "bytes": self.nbytes,
            "problems": self.problems,
        }


def verify(folder: BackupFolder, progress: Progress | None = None) -> Report:
    """Raises ``BackupError`` when there is no backup to check at all."""
    with folder.locked(exclusive=False):
        manifest = Manifest.read(folder.manifest)
        if manifest is None:
            raise BackupError(f"no backup in {folder.root}: it has no {folder.manifest.name}")
        try:
            return _verify(folder, manifest, progress)
        finally:
            manifest.close()


def _verify(folder: BackupFolder, manifest: Manifest, progress: Progress | None) -> Report:
    report = Report()
    check = manifest.check()
    if check != "ok":
        report.problems.append(f"{folder.manifest.name}: damaged ({check})")
    files, nbytes = manifest.totals()
    if progress is not None:
        progress.start("verify", files, nbytes)
    index_ok = False
    for chunk in manifest.entries():
        for entry in chunk:
            path = folder.root / entry.path
            problem = None
            try:
                size = path.stat().st_size
                if size != entry.size:
                    problem = f"corrupted ({size} bytes, the manifest says {entry.size})"
                elif file_digest(path) != entry.blake3:
                    problem = "corrupted (its digest differs)"
            except FileNotFoundError:
                problem = "missing"
            except OSError as exc:
                problem = f"cannot be read ({exc.strerror or exc})"
            if problem is not None:
                report.problems.append(f"{entry.path}: {problem}")
            elif entry.path == INDEX:
                index_ok = True
            report.files += 1
            report.nbytes += entry.size
            if progress is not None:
                progress.advance(1, entry.size)
    if progress is not None:
        progress.finish()
    if manifest.get(INDEX) is None:
        report.problems.append(f"{INDEX}: missing (no backup completed here)")
    elif index_ok:
        # Every file the backup's index names is in the backup, with the index's size.
        for rows in manifest.instances(folder.index).chunks():
            for row in rows:
                name = folder.entry_name(row.path)
                if row.listed is None:
                    report.problems.append(f"{name}: missing (in the index, not in the backup)")
                elif row.listed.size != row.size:
                    report.problems.append(
                        f"{name}: {row.listed.size} bytes in the backup, the index says {row.size}"
                    )
    return report
