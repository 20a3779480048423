"""The well-behaved sender: ``python -m bench.fuzz.sender``, a process of its own.

While the fuzz inputs hit the engine, this pynetdicom SCU stores fresh CT images at a
steady rate, one association per batch (C-ECHO first, then the C-STOREs, then the
release), until SIGTERM; then it finishes the store in progress, releases and exits.
Every C-STORE goes to a journal, one JSON line each, written before the next one starts:
``{"uid": ..., "status": 0, "seconds": ...}``, with ``"status": null`` and an ``"error"``
when no answer came. The campaign checks afterwards that every instance answered
success is stored and indexed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

import orjson
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench.fuzz.messages import small_ct

AE_TITLE = "GOODSENDER"
TIMEOUT = 30.0  # pynetdicom's acse, dimse and network timeouts
RETRY_PAUSE = 0.5


class Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def _write(journal: IO[bytes], record: dict[str, Any]) -> None:
    journal.write(orjson.dumps(record) + b"\n")
    journal.flush()


def run(port: int, called_ae: str, journal_path: Path, tag: str, rate: float, batch: int) -> int:
    stop = Stop()
    signal.signal(signal.SIGTERM, stop)
    ae = AE(ae_title=AE_TITLE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    study = generate_uid(entropy_srcs=[tag, "study"])
    interval = 1.0 / rate
    number = 0
    next_at = time.monotonic()
    with open(journal_path, "ab") as journal:
        while not stop.requested:
            started = time.monotonic()
            assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
            if not assoc.is_established:
                _write(
                    journal, {"event": "association failed", "seconds": time.monotonic() - started}
                )
                time.sleep(RETRY_PAUSE)
                continue
            try:
                echo = assoc.send_c_echo()
                code = int(echo.Status) if "Status" in echo else None
                seconds = round(time.monotonic() - started, 4)
                _write(journal, {"event": "echo", "status": code, "seconds": seconds})
                for _ in range(batch):
                    if stop.requested or not assoc.is_established:
                        break
                    number += 1
                    ds = small_ct(tag, number, size=32, study_uid=study)
                    began = time.monotonic()
                    try:
                        rsp = assoc.send_c_store(ds)
                        code = int(rsp.Status) if "Status" in rsp else None
                        error = "" if code is not None else "no response"
                    except Exception as exc:  # a crash of ours must still be journaled
                        code, error = None, repr(exc)
                    seconds = round(time.monotonic() - began, 4)
                    record: dict[str, Any] = {
                        "uid": str(ds.SOPInstanceUID),
                        "status": code,
                        "seconds": seconds,
                    }
                    if error:
                        record["error"] = error
                    _write(journal, record)
                    next_at = max(next_at + interval, time.monotonic() - 1.0)
                    pause = next_at - time.monotonic()
                    if pause > 0 and not stop.requested:
                        time.sleep(pause)
            finally:
                if assoc.is_established:
                    assoc.release()
                elif not assoc.is_released:
                    _write(journal, {"event": "association ended", "aborted": assoc.is_aborted})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz.sender", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--called-ae", default="ENGINE")
    parser.add_argument("--journal", type=Path, required=True)
    parser.add_argument("--tag", default="goodsender", help="UID entropy: distinct per campaign")
    parser.add_argument("--rate", type=float, default=20.0, help="C-STOREs per second")
    parser.add_argument("--batch", type=int, default=20, help="C-STOREs per association")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(args.port, args.called_ae, args.journal, args.tag, args.rate, args.batch)


if __name__ == "__main__":
    sys.exit(main())
