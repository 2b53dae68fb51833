"""Longer fuzzing by hand with atheris (coverage-guided), beyond what CI's hypothesis runs do.

    pip install -e '.[fuzz]'
    python tests/fault/fuzz_codec.py -atheris_runs=2000000      # or -max_total_time=600

Each input is split into ZMQ frames and fed to ingest's frame handling (shape checks, seq
tracking, holding) and every payload that gets through to the codec. Only MalformedPayload may
come out of the codec; anything else escaping is a crash atheris reports with its input.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import atheris

with atheris.instrument_imports():

    from kvrelay.codec import Codec, MalformedPayload
    from kvrelay.ingest.sequencer import Frame, Sequencer
    from kvrelay.system.metrics import Metrics

logging.disable(logging.WARNING)  # restarts and gaps by the million: counted, not logged
metrics = Metrics()
codec = Codec("msgpack", metrics)
json_codec = Codec("json", metrics)
frames_out: list[Frame] = []
sequencer = Sequencer(0, frames_out.append, metrics)
sequencer.resume(None)  # live, as after start-up


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    count = fdp.ConsumeIntInRange(1, 4)
    frames = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)) for _ in range(count - 1)]
    frames.append(fdp.ConsumeBytes(fdp.remaining_bytes()))
    sequencer.offer_message(frames, 0.0)
    while frames_out:
        payload = frames_out.pop().payload
        for decoder in (codec, json_codec):
            with contextlib.suppress(MalformedPayload):
                decoder.decode(payload)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
