"""A judge behind any OpenAI-compatible /chat/completions server, scored from its top next-token logprobs."""

from __future__ import annotations

import email.utils
import math
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import Any, get_args

import httpx

from em_assets.grid.schema import Refusals
from em_assets.judging.scoring import MIN_MASS, JudgeScore, number_probs_from_tokens, score_from_number_probs
from em_assets.settings import secret

RETRY_STATUS = frozenset({408, 409, 429})
# The error codes of an HTTP 400 refusing a prompt for its content: OpenAI's flagged prompt, Azure's content filter
# (whose inner error names its policy).
REFUSAL_CODES = frozenset({"content_filter", "invalid_prompt", "ResponsibleAIPolicyViolation"})
REFUSALS = get_args(Refusals)


BODY_EXCERPT = 200


class JudgeRequestError(RuntimeError):
    """A judge request that failed for good: retries exhausted, a refused request, or no logprobs."""

    # The prompt whose request failed, where known, so the caller can name the answer (a content filter's refusal
    # is about one answer).
    prompt: str | None = None


class JudgeRefusedError(JudgeRequestError):
    """The server refused the prompt for its content (HTTP 400 with a content-filter code)."""


class JudgeAuthError(JudgeRequestError):
    """The server refused the API key, or asked for one the environment does not hold (HTTP 401 or 403)."""


class JudgeCheckError(JudgeRequestError):
    """The request sent before a command writes anything failed for good: the server cannot be reached, answers
    with an error status, or without the logprobs a judge is scored from."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, *, busy: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        # A server that answered but is busy or failing for now (429, 5xx), not one that cannot be reached.
        self.busy = busy


class OpenAIJudge:
    """Scores judge prompts with one-token completions, as upstream does with GPT-4o."""

    # Hand-written over httpx rather than the official `openai` client, which retries inside each call: once
    # one prompt fails for good (a revoked key, a dead server) this client stops every other request's
    # retries at once instead of after concurrency x retries x backoff; its backoff and Retry-After cap come
    # from the grid (openai's schedule is fixed); and it redacts the key from error bodies it quotes.

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 60,
        max_retries: int = 5,
        min_mass: float = MIN_MASS,
        top_logprobs: int = 20,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        refusals: Refusals = "fail",
    ) -> None:
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout_s > 0, backoff_s >= 0")
        if refusals not in REFUSALS:
            raise ValueError(f"refusals must be one of {REFUSALS}, not {refusals!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.min_mass = min_mass
        self.top_logprobs = top_logprobs
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.refusals = refusals

    def __repr__(self) -> str:
        # The key is read from the environment per call and never stored, so no field here can leak it.
        return f"OpenAIJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def score(
        self, prompts: list[str], on_progress: Callable[[int, int], None] | None = None
    ) -> list[JudgeScore]:
        """Scores in input order; raises JudgeRequestError if any prompt fails."""
        by_index: dict[int, JudgeScore] = {}
        for i, result in self.iter_scores(prompts):
            by_index[i] = result
            if on_progress is not None:
                on_progress(len(by_index), len(prompts))
        return [by_index[i] for i in range(len(prompts))]

    def iter_scores(self, prompts: list[str]) -> Iterator[tuple[int, JudgeScore]]:
        """Yield (index, score) as requests complete.

        After the first failure nothing new is sent; requests in flight may still yield, then it is raised.
        """
        if not prompts:
            return
        key = secret(self.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        stop = threading.Event()
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        with (
            httpx.Client(headers=headers, timeout=self.timeout_s, limits=limits) as client,
            ThreadPoolExecutor(self.concurrency, thread_name_prefix="judge") as pool,
        ):
            pending: dict[Future[JudgeScore], int] = {
                pool.submit(self._score_one, client, p, key, stop): i for i, p in enumerate(prompts)
            }

            def halt() -> None:
                # Queued requests never start; those in flight skip their remaining retries.
                stop.set()
                for other in pending:
                    other.cancel()

            failure: BaseException | None = None
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        i = pending.pop(future)
                        if future.cancelled():
                            continue
                        exc = future.exception()
                        if exc is None:
                            yield i, future.result()
                        elif failure is None:
                            failure = exc
                            if isinstance(exc, JudgeRequestError):
                                exc.prompt = prompts[i]
                            halt()
            finally:
                halt()
            if failure is not None:
                raise failure

    def _score_one(
        self, client: httpx.Client, prompt: str, key: str | None, stop: threading.Event
    ) -> JudgeScore:
        body = self._body(prompt)
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise JudgeRequestError(f"{self.url}: cancelled after another request failed")
            try:
                return self._parse(self._post(client, body, key))
            except JudgeRefusedError:
                if self.refusals == "fail":
                    raise
                return JudgeScore(None, 0.0, {}, refused=True)
            except _Retryable as exc:
                if attempt == self.max_retries:
                    raise JudgeRequestError(
                        f"{self.url}: {exc} (gave up after {self.max_retries + 1} attempts)"
                    ) from None
                stop.wait(self._delay(attempt, exc.retry_after))
        raise AssertionError("unreachable")

    def check_server(self) -> None:
        """One request, not retried, before a command writes anything: JudgeAuthError where the server refuses
        the key (or its absence; a local server may need none), JudgeCheckError where it cannot be reached, answers
        with an error status, or without logprobs. A busy server (429, 5xx) passes: scoring retries those."""
        key = secret(self.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(headers=headers, timeout=self.timeout_s) as client:
            try:
                self._parse(self._post(client, self._body("0"), key))
            except JudgeAuthError:
                raise
            except JudgeRefusedError:
                pass  # a refusal of the check's own prompt says nothing about the answers to be scored
            except JudgeRequestError as exc:
                raise JudgeCheckError(f"judge {self.model} at {exc}") from None
            except _Retryable as exc:
                if not exc.busy:
                    unset = "" if key else f" (${self.api_key_env} is not set)"
                    raise JudgeCheckError(f"judge {self.model} at {self.url}: {exc}{unset}") from None

    def _body(self, prompt: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
            "seed": 0,
        }

    def _post(self, client: httpx.Client, body: dict[str, Any], key: str | None) -> dict[str, Any]:
        try:
            response = client.post(self.url, json=body)
        except httpx.TimeoutException as exc:
            # A server that took the connection but answers slowly is busy, not unreachable.
            busy = not isinstance(exc, httpx.ConnectTimeout)
            raise _Retryable(f"timed out after {self.timeout_s}s ({type(exc).__name__})", busy=busy) from None
        except httpx.TransportError as exc:
            raise _Retryable(f"connection failed: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status in RETRY_STATUS or status >= 500:
            raise _Retryable(f"HTTP {status}: {_excerpt(response, key)}", _retry_after(response), busy=True)
        if status in (401, 403):
            # Servers echo parts of a rejected key in the body (OpenAI shows its prefix and suffix): omit it.
            unset = "" if key else " (it is not set)"
            raise JudgeAuthError(
                f"{self.url}: HTTP {status}: check the API key in ${self.api_key_env}{unset}"
            )
        if status == 400 and _refusal(response):
            raise JudgeRefusedError(
                f"{self.url}: HTTP 400, refused for its content: {_excerpt(response, key)}"
            )
        if status >= 400:
            raise JudgeRequestError(f"{self.url}: HTTP {status}: {_excerpt(response, key)}")
        try:
            return response.json()
        except ValueError:
            raise JudgeRequestError(f"{self.url}: response is not JSON: {_excerpt(response, key)}") from None

    def _parse(self, data: dict[str, Any]) -> JudgeScore:
        try:
            logprobs = data["choices"][0]["logprobs"]
            content = logprobs["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise JudgeRequestError(
                f"{self.url}: no logprobs in the response ({type(exc).__name__}: {exc}); "
                "the server must support logprobs and top_logprobs on chat completions"
            ) from None
        try:
            # GPT-4o now and then answers with no token's logprobs at all; upstream scores that None, and so do we.
            if not content or not content[0].get("top_logprobs"):
                return JudgeScore(None, 0.0, {})
            # A dict keyed by token string, as upstream builds it: a later duplicate string wins.
            probs = {str(t["token"]): math.exp(t["logprob"]) for t in content[0]["top_logprobs"]}
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise JudgeRequestError(
                f"{self.url}: malformed logprobs in the response ({type(exc).__name__}: {exc})"
            ) from None
        return score_from_number_probs(number_probs_from_tokens(probs), self.min_mass)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _refusal(response: httpx.Response) -> bool:
    """Whether an error body names a content refusal: {"error": {"code": ..., "innererror": {"code": ...}}}."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    if not isinstance(error, dict):
        return False
    inner = error.get("innererror")
    codes = {error.get("code"), inner.get("code") if isinstance(inner, dict) else None}
    return bool(codes & REFUSAL_CODES)


def _excerpt(response: httpx.Response, key: str | None) -> str:
    text = response.text.replace(key, "***") if key else response.text
    return " ".join(text[:BODY_EXCERPT].split())
