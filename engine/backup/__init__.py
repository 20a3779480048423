"""Backups of the archive: a copy of the storage folder's instance files and of the index,
made while the engine runs, checked file by file, and restorable into an empty engine.

A backup folder (``python -m engine backup --to DIR``, or ``[backup] destination``)::

    manifest.sqlite    one row per file copied: path (relative to DIR), size, blake3
    index.sqlite       the index as of the last backup (SQLite's online backup API)
    storage/ab/cd/...  the instance files, under the same relative paths as in the storage folder
    backup.json        what the last completed backup did (when, files, any problem)
    .incoming/         temp files being copied (renamed into place when checked)
    .lock              flock held by the backup writing into the folder

Invariants:

- A file appears under its final name only by ``rename`` from ``.incoming`` after it was
  fsynced, read back and found equal (BLAKE3) to the source it was read from.
- A manifest row is added (one transaction per batch of files) only after the files it
  names and their directories are synced; so every row names a complete file, and a
  backup killed at any point is resumed by running it again: what the manifest lists
  is not copied again.
- ``index.sqlite`` is replaced only after every file its instances name is in the
  folder: the index of a backup never names a file the backup lacks (except a source
  file that could not be read, which the backup reports as a failure).
- Nothing is ever removed from a backup folder: a file the engine no longer references
  (an overwritten duplicate) stays, and a file lost from the storage folder is never
  lost from its backup.

The manifest records a digest of the whole file, not the index's ``digest`` (which is
of the dataset as received, after the Part 10 header): the whole file is what a restore
must give back byte for byte, its header included; a transcoded file's bytes are not
those the index's digest was computed from; and a backup's files are checked
(``--verify``) without parsing DICOM. The index's digest is still used, while copying,
to tell a source file that changed since it was stored.
"""
