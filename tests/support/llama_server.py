"""Run llama-cpp-python's OpenAI-compatible server on loopback for tests, and stop it afterwards.

On CPUs with AMX, build it with CMAKE_ARGS="-DGGML_NATIVE=OFF": the native AMX kernels segfaulted here on decode.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

from support.net import free_port


@contextmanager
def llama_server(
    model: Path, *, n_ctx: int = 2048, n_threads: int | None = None, ready_timeout_s: float = 120
) -> Iterator[str]:
    """Start `python -m llama_cpp.server` on a free port; yield its base URL (`http://127.0.0.1:N/v1`)."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        "--chat_format", "chatml",
        # Without logits_all the server cannot return logprobs.
        "--logits_all", "true",
        "--verbose", "false",
    ]  # fmt: skip
    if n_threads is not None:
        cmd += ["--n_threads", str(n_threads), "--n_threads_batch", str(n_threads)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, base_url, ready_timeout_s, log)
            yield base_url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen, base_url: str, timeout_s: float, log: IO[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"llama.cpp server not ready after {timeout_s}s:\n{_tail(log)}")


def _tail(log: IO[bytes], chars: int = 4000) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]
