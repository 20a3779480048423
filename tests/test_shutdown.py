"""SIGTERM while scanners send: every request is answered or its association closed, the
engine exits 0 and marks the stop clean; and a bad configuration stops it at once."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from engine import config as config_module
from engine import status
from engine.config import Config, DicomWebConfig, MetricsConfig, PeerConfig, TlsConfig
from tests.burst import Burst, burst_datasets, check_store, close_socket, raw_socket, restart
from tests.helpers import REPO, Engine, serve_until_exit, write_config

SENDERS = 4
PER_SENDER = 80
SIZE = 256
WAIT = 60.0
# What a C-STORE may be answered while the engine stops: stored, or refused for now.
SHUTDOWN_STATUSES = {status.SUCCESS, status.OUT_OF_RESOURCES, status.PROCESSING_FAILURE}


def _sigterm_during_burst(engine: Engine) -> Burst:
    """Start a burst, SIGTERM the engine while it is under way; the engine must exit 0."""
    burst = Burst(engine, burst_datasets(SENDERS, PER_SENDER, SIZE)).start()
    answered = burst.wait_for_answers(40, WAIT)
    assert burst.connected == SENDERS
    assert answered < burst.total  # still sending when the signal goes out
    assert engine.stop() == 0, engine.log()
    burst.join(WAIT)
    assert burst.errors == []
    assert burst.refused == 0
    # Every answer is success or a failure status; nothing else.
    assert set(burst.answers.values()) <= SHUTDOWN_STATUSES
    # A sender stops at the first request left unanswered (its association is gone).
    assert burst.unanswered <= SENDERS
    return burst


def _check_clean_stop_then_restart(engine: Engine, burst: Burst) -> None:
    log = engine.log()
    assert "pipeline stopped; 0 items still in it" in log
    assert "engine stopped cleanly" in log
    assert (engine.storage / ".clean-shutdown").is_file()

    restart_log = restart(engine)
    # A clean stop: no missing-file check, nothing to recover.
    assert "last stop was not clean" not in restart_log
    assert "recovery" not in restart_log
    assert not (engine.storage / ".clean-shutdown").exists()  # present only while stopped
    rows = check_store(engine, burst.acked, burst.datasets)
    assert set(rows) <= set(burst.datasets)
    assert engine.stop() == 0
    assert (engine.storage / ".clean-shutdown").is_file()


def test_sigterm_lets_open_associations_finish_within_the_grace(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "engine", overrides={"dicom": {"shutdown_grace": 30.0}}).start()
    try:
        burst = _sigterm_during_burst(engine)
        # The associations open at the signal finished within the grace: all stored.
        assert burst.acked == set(burst.datasets)
        assert burst.unanswered == 0
        _check_clean_stop_then_restart(engine, burst)
    finally:
        engine.kill()


def test_sigterm_aborts_what_is_still_open_when_the_grace_ends(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "engine", overrides={"dicom": {"shutdown_grace": 0.5}}).start()
    # An association that stays open and silent: only the end of the grace closes it.
    idle_ae = AE(ae_title="IDLE")
    idle_ae.add_requested_context(Verification)
    idle = idle_ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
    idle_socket = raw_socket(idle)
    try:
        assert idle.is_established
        burst = _sigterm_during_burst(engine)
        assert "aborting association with IDLE at shutdown" in engine.log()
        idle.join(WAIT)  # the engine's A-ABORT (or the closed socket) ends it
        assert not idle.is_established
        _check_clean_stop_then_restart(engine, burst)
    finally:
        idle_ae.shutdown()
        close_socket(idle, idle_socket)
        engine.kill()


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        ("ingest", {"duplicate_policy": "discard"}, "ingest.duplicate_policy"),
        ("ingest", {"duplicate_policy": 3}, "ingest.duplicate_policy"),
        ("ingest", {"duplicate_polcy": "keep"}, "ingest.duplicate_polcy"),
        ("dicom", {"port": "11112"}, "dicom.port"),
        ("storage", {"fsync": "yes"}, "storage.fsync"),
        ("pipeline", {"batch_max": 0}, "pipeline.batch_max"),
        ("dicom", {"ae_title": "A_TITLE_LONGER_THAN_16"}, "dicom.ae_title"),
        ("colour", {"scheme": "dark"}, "colour"),
    ],
)
def test_bad_config_stops_serve_at_once_naming_the_key(
    tmp_path: Path, section: str, values: dict[str, object], named: str
) -> None:
    engine = Engine(tmp_path / "engine", overrides={section: values})
    assert engine.config_path is not None
    result = serve_until_exit(engine.config_path)
    assert result.returncode != 0
    assert f"'{named}'" in result.stderr
    assert result.stderr.startswith("error: ")
    # Refused before touching anything.
    assert not engine.storage.exists()
    assert not engine.index_path.exists()


def test_config_without_a_required_section_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"dicom": {"port": 11112}, "storage": {"path": "s"}})
    result = serve_until_exit(path)
    assert result.returncode != 0
    assert "missing section [index]" in result.stderr


def test_minimal_config_runs_with_defaults(tmp_path: Path) -> None:
    """[dicom], [storage] and [index] only: every other setting takes its default."""
    engine = Engine(tmp_path / "engine").start()
    try:
        assert engine.config_path is not None
        assert set(engine.config_path.read_text().split()) >= {"[dicom]", "[storage]", "[index]"}
        assert "[ingest]" not in engine.config_path.read_text()
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
        assert assoc.is_established
        try:
            rsp = assoc.send_c_echo()
        finally:
            assoc.release()
            ae.shutdown()
        assert rsp.Status == status.SUCCESS
        line = next(x for x in engine.log().splitlines() if "configuration: " in x)
        effective = orjson.loads(line.split("configuration: ", 1)[1])
        defaults = config_module.describe(Config())
        for section in ("ingest", "pipeline", "log"):
            assert effective[section] == defaults[section]
        assert effective["storage"]["fsync"] is True
        assert effective["storage"]["path"] == str(engine.storage)
        assert effective["index"]["path"] == str(engine.index_path)
        assert engine.stop() == 0
    finally:
        engine.kill()


def test_repository_config_loads_and_documents_every_key() -> None:
    path = REPO / "config.toml"
    config = config_module.load(path)
    # Relative paths are taken from the config file's folder, not the working directory.
    assert config.storage.path == REPO / "data" / "storage"
    assert config.storage.quarantine == REPO / "data" / "storage" / ".quarantine"
    assert config.index.path == REPO / "data" / "index.sqlite"
    # Every other value shown is the default.
    shown = config_module.describe(config)
    # [dicomweb] is optional (None by default); the file has it, with every default.
    assert config.dicomweb is not None
    # [metrics] is optional too and shown commented out (test_metrics checks its values).
    assert config.metrics is None
    # [tls] as well (test_tls checks its values).
    assert config.tls is None
    defaults = config_module.describe(
        Config(dicomweb=DicomWebConfig(), metrics=MetricsConfig(), tls=TlsConfig())
    )
    for section, values in defaults.items():
        if isinstance(values, tuple):  # a list of tables at the top ([[forward]]): checked below
            continue
        for key, default in values.items():
            # dicom.peers: none by default; the file declares one for local trials.
            optional = section in ("metrics", "tls")
            if key != "path" and not optional and (section, key) != ("dicom", "peers"):
                assert shown[section][key] == default, f"{section}.{key}"
    assert [(p.ae_title, p.host) for p in config.dicom.peers] == [("ME", "127.0.0.1")]
    for key in PeerConfig.__dataclass_fields__:
        assert f"{key} = " in path.read_text(), f"dicom.peers.{key} is not documented"
    # Every key appears in the file (set, or commented out like quarantine_path).
    text = path.read_text()
    for section, values in defaults.items():
        assert f"[{section}]" in text
        if isinstance(values, tuple):  # none by default; shown commented out (test_forward)
            assert f"# [[{section}]]" in text, f"[[{section}]] is not documented in config.toml"
            continue
        for key in values:
            documented = f"{key} = " in text or f"[[{section}.{key}]]" in text  # a list of tables
            assert documented, f"{section}.{key} is not documented in config.toml"
