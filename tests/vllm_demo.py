"""The router side against the real vLLM engine, for a person to watch: `python tests/vllm_demo.py`.

Starts what the end-to-end test starts (tests/test_vllm_engine.py): a local nats-server, vLLM
0.32 on the CPU serving a tiny random-weight model it builds (installed on first use into the
cached venv of tests/vllm_engine.py: several GB and minutes, once), and `kvrelay run` relaying
vLLM's KV events into JetStream. Then, for a few prompts sharing prefixes, it prints what a
router following the stream predicts (`KvIndex.overlap_tokens`, before the request) beside
what vLLM's prefix cache gave the request (`cached_tokens`), one row per request.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

from harness import RelayProcess, scrape
from vllm_engine import (
    BLOCK_SIZE,
    Unavailable,
    build_model,
    cached_tokens,
    ensure_venv,
    running_server,
    server_command,
)

from kvrelay.router.consumer import KvConsumer
from kvrelay.testing.natsserver import NatsServer, free_port

NS, COMP, INSTANCE = "demo", "vllm", 1


async def settled(relay: RelayProcess, consumer: KvConsumer, within: float = 30) -> None:
    """Until the relay published all it received and the router applied it, for a second."""
    last: tuple[float, float, int] | None = None
    since = deadline = time.monotonic()
    deadline += within
    while time.monotonic() < deadline:
        received = await scrape(relay.system_port, "kvrelay_batches_received_total",
                                dp_rank="0")
        published = await scrape(relay.system_port, "kvrelay_batches_published_total")
        state = (received, published, consumer.stream_seq)
        if received != published or state != last:
            last, since = state, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            return
        await asyncio.sleep(0.1)


async def main() -> int:
    print("the vLLM venv (installed on the first run: several minutes) ...", flush=True)
    try:
        python = ensure_venv()
    except Unavailable as exc:
        print(f"vLLM cannot be installed here: {exc}", file=sys.stderr)
        return 1
    rng = random.Random(7)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, 250) for _ in range(n)]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        nats = NatsServer(folder / "nats", name="demo")
        nats.start()
        try:
            print("building the tiny model ...", flush=True)
            build_model(python, folder / "model")
            port, events, replay = free_port(), free_port("0.0.0.0"), free_port("0.0.0.0")
            command = server_command(python, folder / "model", port, events, replay)
            print("starting vLLM on the CPU (a minute or more) ...", flush=True)
            with running_server(command, port, folder / "vllm.log") as (vllm, startup):
                print(f"vLLM ready after {startup:.0f} s", flush=True)
                relay = RelayProcess(
                    ["--nats", nats.url, "--zmq", f"tcp://127.0.0.1:{events}", "--replay",
                     f"tcp://127.0.0.1:{replay}", "--instance-id", str(INSTANCE),
                     "--namespace", NS, "--component", COMP], folder / "relay.log")
                try:
                    await relay.healthy(within=30)
                    async with KvConsumer(nats.url, NS, COMP) as router:
                        await router.ready()
                        base = prompt(100)
                        steps = [("a new prompt", base), ("the same again", base),
                                 ("2 blocks of it, then new", base[:64] + prompt(40)),
                                 ("1 block of it, then new", base[:32] + prompt(70)),
                                 ("nothing shared", prompt(90)),
                                 ("it, and 50 more", base + prompt(50))]
                        print(f"\n{'request':<28}{'tokens':>7}{'router':>8}{'vLLM':>6}"
                              f"  (leading blocks of {BLOCK_SIZE} tokens)")
                        agree = True
                        for what, tokens in steps:
                            predicted = router.index.overlap_tokens(tokens).get(
                                (INSTANCE, 0), 0)
                            reply = await asyncio.to_thread(vllm.complete, tokens)
                            got = cached_tokens(reply) // BLOCK_SIZE
                            agree &= predicted == got
                            print(f"{what:<28}{len(tokens):>7}{predicted:>8}{got:>6}"
                                  f"  {'ok' if predicted == got else 'DIFFERENT'}", flush=True)
                            await settled(relay, router)
                        print("\nthe router's scores equal vLLM's cache hits" if agree
                              else "\nthe router and vLLM disagree (see above)")
                        return 0 if agree else 1
                finally:
                    relay.stop()
        finally:
            nats.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
