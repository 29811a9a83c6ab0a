"""A judge that fails mid-run keeps whole scored chunks as judgements and every score it got in the judge cache;
a rerun of identical answers takes their scores from the judge cache but writes the new lineage. Retry and
Retry-After rules: tests/unit/test_http_judge.py.
"""

from __future__ import annotations

import pytest
from support.db import count, organism_rows
from support.organisms import CONTROL, SECRET

from em_assets.judging.http import JudgeRequestError
from em_assets.judging.stage import judge_completions
from em_assets.results.store import Store

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(
    ("failure", "match"),
    [
        ("500", r"HTTP 500: .*Bearer \*\*\*.*gave up after 2 attempts"),
        ("nologprobs", "no logprobs in the response"),
    ],
    ids=["http-500", "no-logprobs"],
)
def test_judge_failure_mid_run_keeps_whole_chunks_and_every_score_it_got(ws_sampled, failure, match):
    ws = ws_sampled
    ws.judge.reset(ok_first=3, failure=failure)
    with pytest.raises(JudgeRequestError, match=match) as info:
        judge_completions(ws.ctx(CONTROL, "failing"), chunk_size=2)
    assert SECRET not in str(info.value) and ws.judge.url in str(info.value)
    rows = organism_rows(ws.db, "judgements", CONTROL)
    # The failed chunk writes no judgements, but its one answered request is cached.
    assert rows.height == 2 and rows["score"].null_count() == 0 and count(ws.db, "judge_cache") == 3
    ws.judge.reset()
    rerun = judge_completions(ws.ctx(CONTROL, "fixed"), chunk_size=4)
    assert (rerun.scored, rerun.cache_hits, ws.judge.requests) == (13, 1, 13)
    assert count(ws.db, "judgements", CONTROL) == 16


def test_judgement_of_a_resampled_identical_answer_takes_the_new_lineage_from_the_cache(ws_sampled):
    ws = ws_sampled
    judge_completions(ws.ctx(CONTROL, "first"), chunk_size=8)
    assert ws.judge.requests == 16
    # The same answers under other sampling settings (a backend or an older version that rewrote completions
    # in place): the judge cache has their scores, but every judgement row must carry the new lineage.
    with Store(ws.db).connect() as conn:
        conn.execute("UPDATE completions SET sampling_hash = 'resampled' WHERE organism = ?", [CONTROL])
    ws.judge.reset()
    summary = judge_completions(ws.ctx(CONTROL, "second"), chunk_size=8)
    assert ws.judge.requests == 0 and summary.cache_hits == 16
    rows = organism_rows(ws.db, "judgements", CONTROL)
    assert (
        rows.height == 16
        and set(rows["sampling_hash"]) == {"resampled"}
        and set(rows["run_id"]) == {"second"}
    )
