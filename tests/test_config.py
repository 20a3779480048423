"""The config loader: defaults, relative paths, and a message naming a wrong key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from engine import config as config_module
from engine.config import Config, DuplicatePolicy, PeerConfig, Transcode
from engine.errors import ConfigError
from tests.helpers import REPO

MINIMAL = {"dicom": {}, "storage": {"path": "st"}, "index": {"path": "i.sqlite"}}


def test_repository_config_is_the_documented_default(tmp_path: Path) -> None:
    loaded = config_module.load(REPO / "config.toml")
    defaults = Config()
    assert loaded.dicom.port == 11112
    # The one setting that is not a default: a peer for trying the engine locally.
    assert loaded.dicom.peers == (PeerConfig("ME", "127.0.0.1", 11113),)
    assert dataclasses.replace(loaded.dicom, peers=()) == defaults.dicom
    assert loaded.ingest == defaults.ingest
    assert loaded.pipeline == defaults.pipeline
    assert loaded.storage.fsync is True
    # Relative paths are taken from the config file's folder, not the working directory.
    assert loaded.storage.path == REPO / "data" / "storage"
    assert loaded.index.path == REPO / "data" / "index.sqlite"
    assert loaded.storage.quarantine == REPO / "data" / "storage" / ".quarantine"


def test_minimal_config_takes_defaults(tmp_path: Path) -> None:
    config = config_module.from_mapping(MINIMAL, base=tmp_path)
    assert config.dicom.ae_title == "ENGINE"
    assert config.dicom.maximum_associations > 10
    assert config.ingest.duplicate_policy is DuplicatePolicy.KEEP
    assert config.ingest.transcode is Transcode.NONE
    assert config.storage.path == tmp_path / "st"


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({**MINIMAL, "dicom": {"aetitle": "X"}}, "dicom.aetitle"),
        ({**MINIMAL, "dicom": {"port": "11112"}}, "dicom.port"),
        ({**MINIMAL, "dicom": {"port": 70000}}, "dicom.port"),
        ({**MINIMAL, "dicom": {"ae_title": "A_TITLE_FAR_TOO_LONG"}}, "dicom.ae_title"),
        ({**MINIMAL, "storage": {"path": "st", "fsync": "yes"}}, "storage.fsync"),
        ({**MINIMAL, "ingest": {"duplicate_policy": "ignore"}}, "ingest.duplicate_policy"),
        ({**MINIMAL, "ingest": {"transcode": True}}, "ingest.transcode"),
        ({**MINIMAL, "pipeline": {"queue_size": 0}}, "pipeline.queue_size"),
        ({**MINIMAL, "storage": {"path": "st", "write_threads": -1}}, "storage.write_threads"),
        ({**MINIMAL, "pipeline": {"batch_max": 1.5}}, "pipeline.batch_max"),
        ({**MINIMAL, "webserver": {}}, "webserver"),
        ({"dicom": {}, "storage": {}}, "[index]"),
    ],
)
def test_wrong_settings_are_named(
    tmp_path: Path, raw: dict[str, dict[str, object]], named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        config_module.from_mapping(raw, base=tmp_path)


def test_unreadable_toml_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[dicom\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_module.load(path)


PG_URL = "postgresql://engine@127.0.0.1:5432/pacs"


@pytest.mark.parametrize(
    ("index", "extra", "named"),
    [
        ({"backend": "mysql"}, {}, "index.backend"),
        ({"backend": "postgresql"}, {}, "index.url"),
        ({"backend": "postgresql", "url": "sqlite:///x"}, {}, "index.url"),
        ({"backend": "postgresql", "url": "postgresql://engine:secret@h/db"}, {}, "password"),
        ({"path": "i.sqlite", "url": PG_URL}, {}, "index.url"),
        ({"backend": "postgresql", "url": PG_URL, "node": "1abc"}, {}, "index.node"),
        ({"backend": "postgresql", "url": PG_URL, "node": "a.b"}, {}, "index.node"),
        ({"backend": "postgresql", "url": PG_URL, "pool_size": 0}, {}, "index.pool_size"),
        (
            {"backend": "postgresql", "url": PG_URL},
            {"backup": {"destination": "b", "interval": 60}},
            "backup.interval",
        ),
    ],
)
def test_wrong_index_settings_are_named(
    tmp_path: Path, index: dict[str, object], extra: dict[str, object], named: str
) -> None:
    raw = {**MINIMAL, "index": index, **extra}
    with pytest.raises(ConfigError, match=named):
        config_module.from_mapping(raw, base=tmp_path)


def test_postgresql_node_names(tmp_path: Path) -> None:
    raw = {**MINIMAL, "dicom": {"port": 11150}, "index": {"backend": "postgresql", "url": PG_URL}}
    config = config_module.from_mapping(raw, base=tmp_path)
    assert config.index.shared
    default = config_module.node_name(config)
    # The host name and the DICOM port: two nodes on one machine differ by port.
    assert default.endswith("-11150") and default[0].isalpha()
    assert "." not in default and "/" not in default
    named = config_module.from_mapping(
        {**raw, "index": {**raw["index"], "node": "pacs1"}}, base=tmp_path
    )
    assert config_module.node_name(named) == "pacs1"
    # A lone SQLite engine has no node name: its files keep their names.
    assert config_module.node_name(config_module.from_mapping(MINIMAL, base=tmp_path)) == ""


@pytest.mark.parametrize("command", ["backup", "restore", "reindex", "verify"])
def test_sqlite_only_commands_refuse_postgresql(tmp_path: Path, command: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[dicom]\n[storage]\npath = "st"\n[index]\nbackend = "postgresql"\nurl = "{PG_URL}"\n'
    )
    args = {
        "backup": ["backup", "--to", str(tmp_path / "b")],
        "restore": ["restore", "--from", str(tmp_path / "b")],
        "reindex": ["reindex"],
        "verify": ["verify"],
    }[command]
    done = subprocess.run(
        [sys.executable, "-m", "engine", *args, "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert f"'{command}' works on an SQLite index" in done.stderr
    assert "pg_dump" in done.stderr
