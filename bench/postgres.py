"""A throwaway PostgreSQL cluster on 127.0.0.1, for the tests and the benchmark.

``Cluster(folder).start()`` runs Debian's ``initdb`` and ``pg_ctl start`` (trust
authentication, user ``postgres``, no locale, UTF8), listening on 127.0.0.1 only at an
ephemeral port; ``stop()`` stops that cluster and nothing else. ``running(folder)`` does both
around a ``with`` block. Databases are made and dropped with the cluster's own ``psql`` over
TCP, so nothing here needs a Python driver.

Where the cluster lives: ``folder/data`` (the data directory), ``folder/postgresql.log``
(the server log) and the Unix socket in ``folder``. PostgreSQL refuses to run as root: as
root every command runs as the ``postgres`` user (``runuser -u postgres --``) and
``folder`` is given to that user. That user must also be able to walk down to ``folder``;
pytest's ``/tmp/pytest-of-root`` and ``/root`` are closed to it, so when ``folder`` is out
of its reach the cluster goes into a fresh private directory under the system temp folder
instead (``Cluster.home``), removed by ``stop()``. A Unix socket path is limited to about
100 bytes: when ``folder`` is too deep for one, the cluster listens on TCP only.

fsync stays on by default: the benchmark compares against Orthanc, which syncs.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DEBIAN_ROOT = Path("/usr/lib/postgresql")
SYSTEM_USER = "postgres"
SUPERUSER = "postgres"
INITDB_TIMEOUT = 120.0
PG_CTL_TIMEOUT = 60  # seconds, pg_ctl's own -t
PSQL_TIMEOUT = 60.0
STOP_WAIT = 30.0
LOG_TAIL_LINES = 30
START_ATTEMPTS = 3  # an ephemeral port can be taken between the probe and the bind
# sun_path is 108 bytes on Linux; PostgreSQL appends "/.s.PGSQL.<port>" (up to 17 more).
SOCKET_DIR_MAX = 90
DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
INSTALL_HINT = "install Debian's postgresql package (apt-get install postgresql)"
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "'128MB'",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


class PostgresUnavailable(Exception):
    """No PostgreSQL to run, or the cluster would not start or answer; the message says why."""


def find_bin() -> Path | None:
    """Debian's newest ``/usr/lib/postgresql/<major>/bin``, else the folder of PATH's initdb."""
    candidates: list[tuple[int, Path]] = []
    if DEBIAN_ROOT.is_dir():
        for child in DEBIAN_ROOT.iterdir():
            if child.name.isdigit() and _has_tools(child / "bin"):
                candidates.append((int(child.name), child / "bin"))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    if initdb is not None and _has_tools(Path(initdb).parent):
        return Path(initdb).parent
    return None


def _has_tools(folder: Path) -> bool:
    return all(os.access(folder / tool, os.X_OK) for tool in ("initdb", "pg_ctl"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"(empty log at {path})"


class Cluster:
    """One PostgreSQL cluster this process initialises, starts and stops."""

    def __init__(self, folder: Path, port: int | None = None, *, fsync: bool = True) -> None:
        self._folder = Path(folder).absolute()
        self._fixed_port = port
        self._port = port if port is not None else _free_port()
        self._fsync = fsync
        self._as_root = os.geteuid() == 0
        self._bin: Path | None = None
        self._home = self._folder
        self._private_home = False  # home is a temp directory of ours, removed at stop
        self._pid: int | None = None  # the postmaster we started
        self._use_socket = True

    @property
    def port(self) -> int:
        return self._port

    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def home(self) -> Path:
        """Where the data directory and the log really are (``folder`` unless out of reach)."""
        return self._home

    @property
    def data_dir(self) -> Path:
        return self._home / "data"

    @property
    def log_path(self) -> Path:
        return self._home / "postgresql.log"

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def is_running(self) -> bool:
        return self._pid is not None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self._port}/{database}"

    # -- start and stop ------------------------------------------------------------------

    def start(self) -> Cluster:
        if self._pid is not None:
            return self
        self._bin = find_bin()
        if self._bin is None:
            raise PostgresUnavailable(f"no PostgreSQL binaries (initdb, pg_ctl): {INSTALL_HINT}")
        if self._as_root:
            self._check_system_user()
        self._folder.mkdir(parents=True, exist_ok=True)
        self._prepare_home()
        started = time.monotonic()
        try:
            self._initdb()
            self._start_server()
        except BaseException:
            self.stop()  # also removes a private home: the message carries the log's tail
            raise
        log.info(
            "PostgreSQL started on 127.0.0.1:%d in %.1f s (pid %s, data %s, fsync %s)",
            self._port,
            time.monotonic() - started,
            self._pid,
            self.data_dir,
            "on" if self._fsync else "off",
        )
        return self

    def _start_server(self) -> None:
        for attempt in range(START_ATTEMPTS):
            self._write_settings()
            try:
                self._pg_ctl_start()
                break
            except PostgresUnavailable:
                retry = (
                    self._fixed_port is None
                    and attempt + 1 < START_ATTEMPTS
                    and "could not bind" in _tail(self.log_path)
                )
                if not retry:
                    raise
                log.info("port %d was taken, trying another", self._port)
                self._port = _free_port()

    def stop(self) -> None:
        """``pg_ctl -m fast stop`` of the cluster we started; then, if need be, its PID."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        self._stop_postmaster()
        if self._private_home:
            self._private_home = False
            shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases -----------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns its URL."""
        self.psql(f'CREATE DATABASE "{_checked_name(name)}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop the database (if it exists), closing its connections first."""
        self.psql(f'DROP DATABASE IF EXISTS "{_checked_name(name)}" WITH (FORCE)')

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql over TCP; return its unaligned, tuples-only output."""
        if self._pid is None:
            raise PostgresUnavailable("the cluster is not running")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
            "PGCONNECT_TIMEOUT": "10",
        }
        completed = subprocess.run(
            [
                self._tool("psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self._port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PSQL_TIMEOUT,
            check=False,
        )
        if completed.returncode != 0:
            raise PostgresUnavailable(f"psql {sql!r} failed: {completed.stderr.strip()}")
        return completed.stdout.strip()

    # -- the steps -----------------------------------------------------------------------

    def _check_system_user(self) -> None:
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("as root, runuser (util-linux) is needed to run as postgres")
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise PostgresUnavailable(
                f"running as root needs the system user {SYSTEM_USER!r}: {INSTALL_HINT}"
            ) from None

    def _prepare_home(self) -> None:
        if self.data_dir.exists():
            raise PostgresUnavailable(f"{self.data_dir} exists: a cluster needs a fresh folder")
        if self._as_root:
            shutil.chown(self._folder, SYSTEM_USER, SYSTEM_USER)
            if not self._reachable(self._folder):
                self._home = Path(tempfile.mkdtemp(prefix="bench-pg-"))
                self._private_home = True
                shutil.chown(self._home, SYSTEM_USER, SYSTEM_USER)
                log.info(
                    "%s is out of %s's reach: cluster in %s", self._folder, SYSTEM_USER, self._home
                )
        self._use_socket = len(str(self._home)) <= SOCKET_DIR_MAX

    def _reachable(self, folder: Path) -> bool:
        probe = subprocess.run(
            [
                "runuser",
                "-u",
                SYSTEM_USER,
                "--",
                "test",
                "-w",
                str(folder),
                "-a",
                "-x",
                str(folder),
            ],
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PSQL_TIMEOUT,
            check=False,
        )
        return probe.returncode == 0

    def _initdb(self) -> None:
        # --no-sync: the cluster is thrown away, its creation need not survive a power cut.
        self._run(
            [
                self._tool("initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=INITDB_TIMEOUT,
        )

    def _write_settings(self) -> None:
        settings = {
            **SETTINGS,
            "port": str(self._port),
            "fsync": "on" if self._fsync else "off",
            "unix_socket_directories": f"'{self._home}'" if self._use_socket else "''",
        }
        # postgresql.auto.conf is read last, so these win over postgresql.conf.
        lines = [f"{key} = {value}" for key, value in settings.items()]
        auto = self.data_dir / "postgresql.auto.conf"
        auto.write_text("# written by bench/postgres.py\n" + "\n".join(lines) + "\n")
        if self._as_root:
            shutil.chown(auto, SYSTEM_USER, SYSTEM_USER)

    def _pg_ctl_start(self) -> None:
        atexit.register(self.stop)
        try:
            self._run(
                [
                    self._tool("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    str(PG_CTL_TIMEOUT),
                    "start",
                ],
                timeout=PG_CTL_TIMEOUT + 10,
            )
            self._pid = self._postmaster_pid()
            if self._pid is None:
                raise PostgresUnavailable(
                    f"PostgreSQL started but left no postmaster.pid in {self.data_dir}"
                )
        except (PostgresUnavailable, subprocess.TimeoutExpired) as exc:
            # pg_ctl may have left a postmaster behind (timed out while it was starting).
            pid = self._postmaster_pid()
            if pid is not None:
                self._pid = pid
            self._stop_postmaster()
            raise PostgresUnavailable(
                f"PostgreSQL did not start on 127.0.0.1:{self._port} ({exc}); "
                f"log {self.log_path}:\n{_tail(self.log_path)}"
            ) from None

    def _stop_postmaster(self) -> None:
        pid, self._pid = self._pid, None
        if pid is None:
            return
        try:
            self._run(
                [
                    self._tool("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(PG_CTL_TIMEOUT),
                    "stop",
                ],
                timeout=PG_CTL_TIMEOUT + 10,
            )
        except (PostgresUnavailable, subprocess.TimeoutExpired) as exc:
            log.warning("pg_ctl stop failed (%s); stopping pid %d", exc, pid)
        self._kill_if_alive(pid)

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def _kill_if_alive(self, pid: int) -> None:
        deadline = time.monotonic() + STOP_WAIT
        sent_kill = False
        while _alive(pid):
            if time.monotonic() >= deadline:
                if sent_kill:
                    log.error("postmaster %d still alive after SIGKILL", pid)
                    return
                log.warning("postmaster %d still alive; SIGKILL", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                sent_kill = True
                deadline = time.monotonic() + STOP_WAIT
            time.sleep(0.05)

    def _tool(self, name: str) -> str:
        if self._bin is None:
            self._bin = find_bin()
            if self._bin is None:
                raise PostgresUnavailable(f"no PostgreSQL binaries: {INSTALL_HINT}")
        return str(self._bin / name)

    def _run(self, argv: list[str], timeout: float) -> None:
        if self._as_root:
            argv = ["runuser", "-u", SYSTEM_USER, "--", *argv]
        completed = subprocess.run(
            argv,
            cwd=self._home,
            env={**os.environ, "LC_ALL": "C"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if completed.returncode != 0:
            output = (completed.stderr or completed.stdout).strip()
            tool = Path(argv[argv.index("--") + 1] if self._as_root else argv[0]).name
            raise PostgresUnavailable(f"{tool} exited {completed.returncode}: {output}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours would count as alive; the postmaster is pg_ctl's child, not ours.
    return True


def _checked_name(name: str) -> str:
    if not DATABASE_NAME.match(name):
        raise ValueError(f"database name {name!r}: letters, digits and _ only")
    return name


@contextlib.contextmanager
def running(folder: Path, port: int | None = None, *, fsync: bool = True) -> Iterator[Cluster]:
    """A started cluster in ``folder`` for the ``with`` block, stopped at its end."""
    cluster = Cluster(folder, port, fsync=fsync)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
