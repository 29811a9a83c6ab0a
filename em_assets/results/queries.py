"""Named queries over the results database: the only SQL the stages run."""

from __future__ import annotations

from em_assets.context import MissingUpstreamError
from em_assets.results.store import Store

# Lineage kept beside each organism's rates so any number can be traced to the bytes and settings behind it.
LINEAGE_SQL = """
SELECT c.organism,
       any_value(c.base_revision) AS base_revision,
       any_value(c.dataset_sha256) AS dataset_sha256,
       any_value(c.adapter_sha256) AS adapter_sha256,
       any_value(c.sampling_hash) AS sampling_hash,
       any_value(c.temperature) AS temperature,
       any_value(c.top_p) AS top_p,
       any_value(c.max_new_tokens) AS max_new_tokens,
       any_value(c.eval_set) AS eval_set,
       string_agg(DISTINCT j.judge_model, ',') AS judge_model,
       string_agg(DISTINCT j.judge_revision, ',') AS judge_revision,
       string_agg(DISTINCT CASE WHEN j.metric = 'aligned' THEN j.prompt_hash END, ',') AS aligned_prompt_hash,
       string_agg(DISTINCT CASE WHEN j.metric = 'coherent' THEN j.prompt_hash END, ',') AS coherent_prompt_hash,
       any_value(a.run_id) AS adapter_run_id,
       string_agg(DISTINCT c.run_id, ',') AS completions_run_id,
       string_agg(DISTINCT j.run_id, ',') AS judgements_run_id
FROM completions c
LEFT JOIN judgements j USING (organism, question_id, paraphrase_idx, sample_idx)
LEFT JOIN lora_adapters a USING (organism)
GROUP BY c.organism
"""


def one_row(store: Store, sql: str, params: list, what: str) -> dict:
    df = store.query(sql, params)
    if df.height == 0:
        raise MissingUpstreamError(what)
    return df.row(0, named=True)


def base_model_row(store: Store, name: str) -> dict:
    return one_row(
        store,
        "SELECT * FROM base_models WHERE name = ?",
        [name],
        f"base model {name!r} is not resolved yet: materialise base_models first",
    )


def adapter_row(store: Store, key: str) -> dict:
    return one_row(
        store,
        "SELECT * FROM lora_adapters WHERE organism = ?",
        [key],
        f"organism {key}: no adapter row; materialise lora_adapter first",
    )
