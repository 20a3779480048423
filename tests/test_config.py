"""The config loader: defaults, relative paths, and a message naming a wrong key."""

from __future__ import annotations

import dataclasses
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
