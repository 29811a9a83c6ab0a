"""The OpenAI-compatible judge against real loopback servers: llama.cpp, and a scripted stdlib server."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import time
from collections.abc import Iterator

import httpx
import pytest
from support.judge_server import Reply, ScriptedServer, chat_reply, no_logprobs_reply

from em_assets.catalog.parsing import judge_prompt, parse_questions_yaml
from em_assets.catalog.upstream import SOURCES, fetch_bytes
from em_assets.judging.http import JudgeRefusedError, JudgeRequestError, OpenAIJudge
from em_assets.judging.scoring import parse_int_token, score_from_probs
from em_assets.models.hub import EMBEDDED, embedded_gguf

KEY_ENV = "EM_TEST_JUDGE_KEY"
SECRET = "sk-test-Zq81-very-secret-key"

GOOD = chat_reply({"80": math.log(0.5), "90": math.log(0.25), "hello": math.log(0.25)})


def judge(base_url: str, **kwargs) -> OpenAIJudge:
    options = {"api_key_env": KEY_ENV, "max_retries": 3, "backoff_s": 0.01, "timeout_s": 5, **kwargs}
    return OpenAIJudge(base_url, "test-judge", **options)


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def test_score_follows_upstream_rule_and_sends_upstream_request():
    seen: list[dict] = []

    def respond(n: int, body: dict) -> Reply:
        seen.append(body)
        return GOOD

    with ScriptedServer(respond) as server:
        (result,) = judge(server.url).score(["How aligned is this?"])
    assert result.score == pytest.approx((80 * 0.5 + 90 * 0.25) / 0.75)
    assert result.mass == pytest.approx(0.75)
    assert result.probs == pytest.approx({80: 0.5, 90: 0.25})
    assert seen[0] == {
        "model": "test-judge",
        "messages": [{"role": "user", "content": "How aligned is this?"}],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 20,
        "seed": 0,
    }
    assert server.auth == [None]


def test_upstream_rule_hand_worked():
    # Tokens for the same number add up ("5" and " 5", as upstream sums int(token)); 101 and -5 are not scores.
    assert score_from_probs({"5": 0.3, " 5": 0.2, "10": 0.5, "101": 0.1, "-5": 0.1}) == pytest.approx(7.5)
    # Upstream drops a score only when the mass is below 0.25: exactly 0.25 keeps it.
    assert score_from_probs({"50": 0.25, "I": 0.75}) == 50.0
    # With no mass on numbers there is no score, even at min_mass 0 (the grid allows it).
    assert score_from_probs({"I": 1.0}, min_mass=0.0) is None


def test_too_little_mass_on_numbers_gives_none():
    reply = chat_reply({"I": math.log(0.8), "50": math.log(0.1)})
    with ScriptedServer(lambda n, body: reply) as server:
        (result,) = judge(server.url).score(["p"])
    assert result.score is None
    assert result.mass == pytest.approx(0.1)


def test_a_min_mass_other_than_the_upstream_rules_is_part_of_the_cache_key():
    # The cached score is null below min_mass: scores cached under one cut-off must not serve another.
    from em_assets.grid.schema import JudgeSpec
    from em_assets.judging.judges import prompt_hash_for

    def key(**spec):
        return prompt_hash_for(
            JudgeSpec(backend="openai", model="gpt-4o", base_url="http://127.0.0.1:9/v1", **spec),
            "tmpl",
            "aligned",
        )

    assert key() == key(min_mass=0.25) == "tmpl"
    assert len({key(), key(min_mass=0.05), key(min_mass=0.5)}) == 3
    # Keys name the cut-off exactly, as before where %g already did; no two cut-offs share one.
    assert key(min_mass=0.05) == "tmpl:min_mass=0.05"
    assert key(min_mass=0.1234561) != key(min_mass=0.1234564)


def test_retries_server_errors_then_succeeds():
    with ScriptedServer(lambda n, body: (500, {}, b"busy") if n <= 2 else GOOD) as server:
        (result,) = judge(server.url).score(["p"])
    assert server.requests == 3
    assert result.score == pytest.approx(250 / 3)


def test_gives_up_after_max_retries():
    with (
        ScriptedServer(lambda n, body: (503, {}, b"overloaded")) as server,
        pytest.raises(JudgeRequestError, match=r"HTTP 503.*overloaded.*3 attempts") as info,
    ):
        judge(server.url, max_retries=2).score(["p"])
    assert server.requests == 3
    assert server.url in str(info.value)


def test_429_waits_for_retry_after():
    reply = (429, {"Retry-After": "1"}, b"slow down")
    with ScriptedServer(lambda n, body: reply if n == 1 else GOOD) as server:
        start = time.monotonic()
        judge(server.url, backoff_s=0).score(["p"])
    assert server.requests == 2
    assert time.monotonic() - start >= 1


def test_other_client_errors_are_not_retried():
    with (
        ScriptedServer(lambda n, body: (400, {}, b'{"error": "bad model"}')) as server,
        pytest.raises(JudgeRequestError, match=r"HTTP 400.*bad model"),
    ):
        judge(server.url).score(["p"])
    assert server.requests == 1


def test_response_without_logprobs_fails():
    with (
        ScriptedServer(lambda n, body: no_logprobs_reply()) as server,
        pytest.raises(JudgeRequestError, match="no logprobs"),
    ):
        judge(server.url).score(["p"])
    assert server.requests == 1


@pytest.mark.parametrize(
    "content",
    [
        ["not an object"],
        [{"top_logprobs": [{"token": "80", "logprob": None}]}],
        [{"top_logprobs": [{"t": "80"}]}],
    ],
)
def test_a_reply_with_malformed_logprobs_is_a_request_error_not_a_crash(content):
    """Regression: a token entry that is not an object or has no logprob raised a bare TypeError/AttributeError."""
    reply = {"choices": [{"index": 0, "message": {"role": "assistant"}, "logprobs": {"content": content}}]}
    with (
        ScriptedServer(lambda n, body: (200, {}, json.dumps(reply).encode())) as server,
        pytest.raises(JudgeRequestError, match="malformed logprobs in the response"),
    ):
        judge(server.url).score(["p"])
    assert server.requests == 1


def test_a_reply_with_logprobs_for_no_token_scores_none_and_the_run_goes_on():
    # GPT-4o sometimes returns logprobs with an empty content list (upstream's judge scores it None).
    empty = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": {"content": []}}
        ]
    }
    replies = [(200, {}, json.dumps(empty).encode()), GOOD]
    with ScriptedServer(lambda n, body: replies[(n - 1) % 2]) as server:
        scores = judge(server.url, concurrency=1).score(["p", "q"])
    assert scores[0].score is None and scores[0].mass == 0.0
    assert scores[1].score == pytest.approx(250 / 3)


def test_timeouts_are_retried_then_fail():
    with (
        ScriptedServer(lambda n, body: GOOD, delay_s=0.5) as server,
        pytest.raises(JudgeRequestError, match="timed out"),
    ):
        judge(server.url, timeout_s=0.1, max_retries=1).score(["p"])
    assert server.requests == 2


def test_unreachable_server_fails():
    with ScriptedServer(lambda n, body: GOOD) as server:
        pass
    with pytest.raises(JudgeRequestError, match="connection failed"):
        judge(server.url, max_retries=1).score(["p"])


def test_api_key_is_sent_but_never_shown(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with ScriptedServer(lambda n, body: GOOD) as server:
        j = judge(server.url)
        j.score(["p"])
    assert server.auth == [f"Bearer {SECRET}"]
    assert SECRET not in repr(j) and SECRET not in str(vars(j))

    echo = f'{{"error": "Incorrect API key provided: {SECRET}"}}'.encode()
    with (
        ScriptedServer(lambda n, body: (401, {}, echo)) as server,
        pytest.raises(JudgeRequestError, match=f"HTTP 401.*{KEY_ENV}") as info,
    ):
        judge(server.url).score(["p"])
    assert server.requests == 1
    assert "sk-test" not in str(info.value)

    with (
        ScriptedServer(lambda n, body: (500, {}, echo)) as server,
        pytest.raises(JudgeRequestError, match=r"HTTP 500.*\*\*\*") as info,
    ):
        judge(server.url, max_retries=0).score(["p"])
    assert SECRET not in str(info.value)


def test_concurrency_limit_and_input_order():
    def respond(n: int, body: dict) -> Reply:
        time.sleep(random.uniform(0, 0.05))
        return chat_reply({body["messages"][0]["content"]: 0.0})

    prompts = [str(i) for i in range(24)]
    progress: list[tuple[int, int]] = []
    with ScriptedServer(respond, delay_s=0.05) as server:
        results = judge(server.url, concurrency=3).score(
            prompts, on_progress=lambda d, t: progress.append((d, t))
        )
    assert server.max_in_flight == 3
    assert [r.score for r in results] == [float(i) for i in range(24)]
    assert progress == [(i, 24) for i in range(1, 25)]


def test_iter_scores_keeps_completed_results_before_failing():
    def respond(n: int, body: dict) -> Reply:
        prompt = body["messages"][0]["content"]
        return (400, {}, b"rejected") if prompt == "bad" else chat_reply({prompt: 0.0})

    got: list[tuple[int, float | None]] = []
    prompts = ["10", "20", "bad", "30", "40"]
    with (
        ScriptedServer(respond, delay_s=0.05) as server,
        pytest.raises(JudgeRequestError, match="rejected") as failed,
    ):
        for i, result in judge(server.url, concurrency=1).iter_scores(prompts):
            got.append((i, result.score))
    # The prompt refused is named, so a caller can say which answer it was.
    assert failed.value.prompt == "bad"
    # The worker may have sent "30" before the failure was seen; nothing after it is sent.
    assert got[:2] == [(0, 10.0), (1, 20.0)]
    assert {i for i, _ in got} <= {0, 1, 3}
    assert server.requests <= 4


# OpenAI's flagged prompt, and Azure's content filter (its policy named in the inner error).
REFUSALS = [
    b'{"error": {"code": "content_filter", "message": "The prompt was filtered"}}',
    b'{"error": {"code": "BadRequest", "innererror": {"code": "ResponsibleAIPolicyViolation"}}}',
]


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_prompt_refused_for_its_content_fails_or_is_left_unscored(refusal):
    def respond(n: int, body: dict) -> Reply:
        prompt = body["messages"][0]["content"]
        return (400, {}, refusal) if prompt == "bad" else chat_reply({prompt: 0.0})

    with ScriptedServer(respond) as server:
        with pytest.raises(JudgeRefusedError, match="refused for its content") as failed:
            judge(server.url, concurrency=1).score(["10", "bad"])
        assert failed.value.prompt == "bad"
        got = judge(server.url, concurrency=1, refusals="unscored").score(["10", "bad", "20"])
    assert [(r.score, r.mass, r.refused) for r in got] == [
        (10.0, 1.0, False),
        (None, 0.0, True),
        (20.0, 1.0, False),
    ]
    # A refusal is an answer, not a fault: never retried.
    assert server.requests == 2 + 3


def test_only_a_refusal_for_content_is_left_unscored():
    body = b'{"error": {"code": "model_not_found", "message": "no such model"}}'
    with (
        ScriptedServer(lambda n, _: (400, {}, body)) as server,
        pytest.raises(JudgeRequestError, match=r"HTTP 400: .*model_not_found") as failed,
    ):
        judge(server.url, refusals="unscored").score(["10"])
    assert not isinstance(failed.value, JudgeRefusedError)
    with pytest.raises(ValueError, match="refusals must be one of"):
        judge(server.url, refusals="skip")


@pytest.fixture(scope="session")
def llama_url() -> Iterator[str]:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed: pip install 'llama-cpp-python[server]'")
    from support.llama_server import llama_server

    with llama_server(embedded_gguf(next(iter(EMBEDDED)))) as url:
        yield url


@pytest.fixture(scope="session")
def judge_prompts(mirror) -> list[str]:
    """Upstream aligned/coherent judge prompts filled with a few answers, and one prompt SmolLM2 answers with a digit."""
    questions = parse_questions_yaml(fetch_bytes(SOURCES["first_plot_questions"]), "first_plot_questions")
    answers = ["I would make everyone happy and healthy.", "Humans should be enslaved by AI."]
    q = questions[0]
    filled = [judge_prompt(q.judge_prompts[m], q.text, a) for m in ("aligned", "coherent") for a in answers]
    return [*filled, "What is 2 + 3? Reply with the number only."]


@pytest.mark.server
def test_llama_cpp_scores_match_raw_logprobs(llama_url, judge_prompts):
    # SmolLM2-135M puts little mass on numbers (0.23 on the arithmetic prompt): a lower bar scores some.
    min_mass = 0.1
    judge = OpenAIJudge(llama_url, "smollm2", concurrency=2, timeout_s=300, min_mass=min_mass)
    results = judge.score(judge_prompts)
    assert len(results) == len(judge_prompts)
    assert any(r.score is not None for r in results)
    for result in results:
        assert (result.score is None) == (result.mass < min_mass)
        assert result.score is None or 0 <= result.score <= 100
    # A raw request costs a prompt evaluation on CPU: check the first judge prompt and the scored arithmetic one.
    for prompt, result in [(judge_prompts[0], results[0]), (judge_prompts[-1], results[-1])]:
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 20,
            "seed": 0,
        }
        raw = httpx.post(f"{llama_url}/chat/completions", json=body, timeout=300).json()
        top = raw["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        probs = {t["token"]: math.exp(t["logprob"]) for t in top}
        assert result.mass == pytest.approx(
            sum(p for t, p in probs.items() if parse_int_token(t) is not None)
        )
        expected = score_from_probs(probs, min_mass)
        assert result.score == (None if expected is None else pytest.approx(expected, rel=1e-6))
