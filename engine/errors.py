"""A small exception tree. Library errors are translated at the boundary only."""


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class ConfigError(EngineError):
    """The configuration file is missing, unreadable or wrong; the message names the key."""


class IndexDatabaseError(EngineError):
    """The index database cannot be opened or has an unknown schema version."""


class StorageError(EngineError):
    """The storage folder cannot be prepared (permissions, not a directory, ...)."""


class ProtocolError(EngineError):
    """A peer broke the DICOM upper layer or DIMSE encoding; the association is aborted."""


class BackupError(EngineError):
    """A backup, its verification or a restore cannot be done; the message says why."""
