"""The fake OpenAI-compatible judge: a real /chat/completions server on 127.0.0.1 with scripted replies.

ScriptedServer answers request n with `respond(n, body)`; FaultJudge is a script on top of it (answer the first
requests, then fail with a given fault) for the stage and Dagster fault tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, dict[str, str], bytes]  # status, extra headers, body


def chat_reply(top: dict[str, float]) -> Reply:
    """A /chat/completions body whose first token has these top logprobs (token -> logprob)."""
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top.items()]
    first = next(iter(top))
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": first},
        "logprobs": {"content": [{"token": first, "logprob": top[first], "top_logprobs": entries}]},
        "finish_reason": "length",
    }
    return 200, {}, json.dumps({"object": "chat.completion", "choices": [choice]}).encode()


def no_logprobs_reply() -> Reply:
    """A chat completion with a plain answer and no logprobs (a server that ignores `logprobs`)."""
    plain = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "80"}, "logprobs": None}]}
    return 200, {}, json.dumps(plain).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client killed or timed out mid-request is the point of several tests


@dataclass
class ScriptedServer:
    """A real HTTP server on 127.0.0.1 whose replies come from `respond(request_number, body)`, after `delay_s`.

    Counts requests and those in flight (and the most at once); `auth` keeps each request's Authorization header.
    """

    respond: Callable[[int, dict], Reply] | None = None
    delay_s: float = 0.0
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    auth: list[str | None] = field(default_factory=list, repr=False)  # may hold a key: keep it out of reports
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _server: _Server | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _reply(self, body: dict, auth: str | None) -> Reply:
        with self.lock:
            self.requests += 1
            n = self.requests
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.auth.append(auth)
        try:
            time.sleep(self.delay_s)
            return self.answer(n, body, auth)
        finally:
            with self.lock:
                self.in_flight -= 1

    def answer(self, n: int, body: dict, auth: str | None) -> Reply:
        """Request n's reply: the script's (a subclass may read the Authorization header too)."""
        assert self.respond is not None
        return self.respond(n, body)

    def __enter__(self) -> ScriptedServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers, payload = outer._reply(body, self.headers.get("Authorization"))
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


def _hashed_reply(prompt: str) -> Reply:
    """A one-token reply whose top logprobs put 0.7 / 0.3 on two numbers derived from the prompt."""
    n = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 101
    return chat_reply({str(n): math.log(0.7), str((n + 37) % 101): math.log(0.3)})


class FaultJudge(ScriptedServer):
    """A judge whose first `ok_first` requests are answered, then `failure` applies: "500" (the body echoes the
    caller's Authorization header, as some servers echo a rejected key), "nologprobs", or "stall" (the request
    hangs until `release()`, at most 60 s; `stalled` is set when the first one hangs, `waiting` counts those
    hanging). Answers are derived from the prompt, so a rerun scores alike; `requests` counts since `reset`."""

    def __init__(self, ok_first: int | None = None, failure: str | None = None) -> None:
        super().__init__()
        self.ok_first, self.failure = ok_first, failure
        self.waiting = 0
        self.stalled = threading.Event()
        self._release = threading.Event()

    def reset(self, ok_first: int | None = None, failure: str | None = None) -> None:
        with self.lock:
            self.ok_first, self.failure, self.requests = ok_first, failure, 0
            self.stalled.clear()
            self._release.clear()

    def release(self) -> None:
        self.reset()
        self._release.set()

    def answer(self, n: int, body: dict, auth: str | None) -> Reply:
        with self.lock:
            failing = self.failure is not None and (self.ok_first is None or n > self.ok_first)
            failure = self.failure
        if failing and failure == "stall":
            with self.lock:
                self.waiting += 1
            self.stalled.set()
            self._release.wait(60)
            with self.lock:
                self.waiting -= 1  # released: answered like any other request
        elif failing and failure == "500":
            return 500, {}, json.dumps({"error": f"backend down; you sent {auth}"}).encode()
        elif failing and failure == "nologprobs":
            return no_logprobs_reply()
        return _hashed_reply(body["messages"][0]["content"])

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        super().__exit__(*exc)
