"""The index behind one interface (``base.Index``); SQLite is the embedded backend."""
