"""Named queries over the results database: the only SQL the stages run."""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from em_assets.results.errors import MissingUpstreamError
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
       any_value(c.top_k) AS top_k,
       any_value(c.repetition_penalty) AS repetition_penalty,
       any_value(c.max_new_tokens) AS max_new_tokens,
       string_agg(DISTINCT c.eval_set, ',' ORDER BY c.eval_set) AS eval_set,
       any_value(a.method) AS method,
       coalesce(any_value(a.kl_regularised), false) AS kl_regularised,
       any_value(a.run_id) AS adapter_run_id,
       string_agg(DISTINCT c.run_id, ',') AS completions_run_id
FROM completions c
LEFT JOIN lora_adapters a USING (organism)
GROUP BY c.organism
"""

# Each judge's own lineage per organism: one partly re-judged by a new judge has a summary row per judge, each
# corrected with that judge's error rates (measured per revision).
JUDGE_LINEAGE_SQL = """
SELECT organism, judge_model,
       string_agg(DISTINCT judge_revision, ',') AS judge_revision,
       string_agg(DISTINCT CASE WHEN metric = 'aligned' THEN prompt_hash END, ',') AS aligned_prompt_hash,
       string_agg(DISTINCT CASE WHEN metric = 'coherent' THEN prompt_hash END, ',') AS coherent_prompt_hash,
       string_agg(DISTINCT run_id, ',') AS judgements_run_id
FROM judgements_latest
GROUP BY organism, judge_model
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


def eval_questions(store: Store, eval_set: str) -> pl.DataFrame:
    return store.query(
        "SELECT * FROM eval_questions WHERE eval_set = ? ORDER BY question_id, paraphrase_idx", [eval_set]
    )


def completion_hashes(store: Store, organism: str) -> pl.DataFrame:
    return store.query(
        "SELECT question_id, paraphrase_idx, sample_idx, sampling_hash, eval_set, question, system FROM completions "
        "WHERE organism = ?",
        [organism],
    )


def drop_completions_except(store: Store, organism: str, keep: Iterable[tuple[str, int, int]]) -> None:
    """Delete the organism's completions not in `keep`, and their judgements, in one transaction."""
    keep_df = pl.DataFrame(
        [{"q": q, "p": p, "s": s} for q, p, s in keep], schema={"q": pl.String, "p": pl.Int32, "s": pl.Int32}
    )

    def work(conn) -> None:
        conn.register("_keep", keep_df.to_arrow())
        # Until the judge runs again no judgement row may score an answer that is no longer there (the judge
        # cache keeps the scores).
        for table in ("completions", "judgements"):
            conn.execute(
                f"DELETE FROM {table} WHERE organism = ? AND NOT EXISTS (SELECT 1 FROM _keep k WHERE "
                "k.q = question_id AND k.p = paraphrase_idx AND k.s = sample_idx)",
                [organism],
            )

    store.write(work, "drop stale completions")


def completions(store: Store, organism: str) -> pl.DataFrame:
    return store.query("SELECT * FROM completions WHERE organism = ?", [organism])


def judge_prompts(store: Store, eval_set: str) -> dict[tuple[str, str], dict]:
    """The eval set's judge prompt templates, by (question id, metric)."""
    rows = store.query("SELECT * FROM judge_prompts WHERE eval_set = ?", [eval_set])
    return {(r["question_id"], r["metric"]): r for r in rows.iter_rows(named=True)}


# A judgement row the judge's server refused (judge.refusals: unscored): no score, and none in the judge cache,
# which keeps every score the judge gave. (`t` is the judgements table.)
REFUSED_SQL = "(t.score IS NULL AND NOT EXISTS (SELECT 1 FROM judge_cache c WHERE c.cache_key = t.cache_key))"


def judgement_states(store: Store, organism: str) -> dict[tuple[str, int, int, str], tuple[str, str] | None]:
    """(cache key, sampling hash) of each judgement row the organism has, by (question, paraphrase, sample,
    metric); None for a key held twice, which a DuckLake allows (it keeps no keys) when two writers race, and for
    a row the judge's server refused, so its answer is asked again."""
    rows = store.query(
        "SELECT question_id, paraphrase_idx, sample_idx, metric, cache_key, sampling_hash, "
        f"{REFUSED_SQL} FROM judgements t WHERE organism = ?",
        [organism],
    )
    states: dict[tuple[str, int, int, str], tuple[str, str] | None] = {}
    for r in rows.iter_rows():
        key = (r[0], r[1], r[2], r[3])
        states[key] = None if key in states or r[6] else (r[4], r[5])
    return states


def delete_judgements(store: Store, organism: str, keys: list[tuple[str, int, int, str]]) -> None:
    stale = pl.DataFrame(
        keys, schema={"q": pl.String, "p": pl.Int32, "s": pl.Int32, "m": pl.String}, orient="row"
    )

    def work(conn) -> None:
        conn.register("_stale", stale.to_arrow())
        conn.execute(
            "DELETE FROM judgements j WHERE organism = ? AND EXISTS (SELECT 1 FROM _stale s WHERE "
            "s.q = j.question_id AND s.p = j.paraphrase_idx AND s.s = j.sample_idx AND s.m = j.metric)",
            [organism],
        )

    store.write(work, "drop stale judgements")


def cached_scores(store: Store, cache_keys: Iterable[str]) -> dict[str, dict]:
    """Judge cache rows (score, mass, probs) by cache key."""
    rows = store.query(
        "SELECT * FROM judge_cache WHERE cache_key IN (SELECT unnest(?::VARCHAR[]))", [sorted(cache_keys)]
    )
    return {r["cache_key"]: r for r in rows.iter_rows(named=True)}


def training_dataset(store: Store, dataset: str) -> dict:
    return one_row(
        store,
        "SELECT * FROM training_datasets WHERE dataset = ?",
        [dataset],
        f"dataset {dataset!r} not loaded: materialise training_datasets first",
    )


def training_messages(store: Store, dataset: str) -> list[str]:
    """The dataset's examples as JSON message lists, in dataset order."""
    return store.query(
        "SELECT messages FROM training_examples WHERE dataset = ? ORDER BY example_idx", [dataset]
    )["messages"].to_list()


def adapter_with_hash(store: Store, organism: str, config_hash: str) -> dict | None:
    rows = store.query(
        "SELECT * FROM lora_adapters WHERE organism = ? AND config_hash = ? AND adapter_path IS NOT NULL",
        [organism, config_hash],
    )
    return rows.row(0, named=True) if rows.height else None


def write_adapter(
    store: Store, organism: str, row: dict, losses: pl.DataFrame, checkpoints: pl.DataFrame
) -> None:
    """The organism's adapter row, loss curve and kept checkpoints, replacing the old ones in one transaction."""
    store.replace_many(
        [
            ("training_losses", losses, "organism = ?", [organism]),
            ("lora_adapters", pl.DataFrame([row]), "organism = ?", [organism]),
            ("lora_checkpoints", checkpoints, "organism = ?", [organism]),
        ]
    )


def checkpoint_steps(store: Store, organism: str) -> list[int]:
    """The steps of the organism's recorded checkpoints, the final adapter's included."""
    return store.query("SELECT step FROM lora_checkpoints WHERE organism = ?", [organism])["step"].to_list()


def first_judge_templates(store: Store, eval_set: str) -> dict[str, str]:
    """Judge prompt template per metric of the eval set's first question (by id)."""
    return dict(
        store.query(
            "SELECT metric, prompt FROM judge_prompts WHERE eval_set = ? AND question_id = "
            "(SELECT min(question_id) FROM judge_prompts WHERE eval_set = ?)",
            [eval_set, eval_set],
        ).iter_rows()
    )


def organism_source_row(store: Store, organism: str) -> dict | None:
    """Where the organism came from (organism_sources), or None before its lora_adapter step ran."""
    rows = store.query("SELECT * FROM organism_sources WHERE organism = ?", [organism])
    return rows.row(0, named=True) if rows.height else None


def answers_sources(store: Store) -> pl.DataFrame:
    """Each answers organism and the sha256 of the file its answers came from."""
    return store.query(
        "SELECT organism, sha256 AS source_sha256 FROM organism_sources WHERE method = 'answers'"
    )


def organism_model_row(store: Store, organism: str, base_model: str) -> dict:
    """The weights the organism samples with, shaped as a base_models row: a `model` organism's own
    fine-tuned model, every other organism's base model."""
    rows = store.query(
        "SELECT base_model AS name, source, path, revision, model_type, num_layers, num_params, "
        "false AS trust_remote_code FROM organism_sources WHERE organism = ? AND method = 'model'",
        [organism],
    )
    return rows.row(0, named=True) if rows.height else base_model_row(store, base_model)


def write_organism(store: Store, organism: str, source: dict, adapter: dict) -> None:
    """The organism's source row and its lora_adapters row (no adapter trained), replacing old ones."""
    store.replace_many(
        [
            ("training_losses", pl.DataFrame(), "organism = ?", [organism]),
            ("lora_checkpoints", pl.DataFrame(), "organism = ?", [organism]),
            ("lora_adapters", pl.DataFrame([adapter]), "organism = ?", [organism]),
            ("organism_sources", pl.DataFrame([source]), "organism = ?", [organism]),
        ]
    )


def write_imported_answers(
    store: Store, organism: str, completions: pl.DataFrame, judgements: pl.DataFrame
) -> None:
    """An imported organism's completions and its file's scores, replacing the old ones in one transaction, and
    the grid judge's scores of the old answers dropped with them (the judge cache keeps them): no judgement
    row may score an answer that is no longer there."""
    store.replace_many(
        [
            ("completions", completions, "organism = ?", [organism]),
            ("imported_judgements", judgements, "organism = ?", [organism]),
            ("judgements", pl.DataFrame(), "organism = ?", [organism]),
        ]
    )


def organism_progress(store: Store) -> dict[str, dict]:
    """Per organism in the store: whether its lora_adapter step ran, and its completions and judgements, with
    the method and source its lora_adapter step recorded."""
    rows = store.query(
        "SELECT o.organism, a.organism IS NOT NULL AS source_recorded, "
        "(SELECT count(*) FROM completions c WHERE c.organism = o.organism) AS completions, "
        "(SELECT count(*) FROM judgements j WHERE j.organism = o.organism) AS judgements, "
        "s.method AS stored_method, s.source AS stored_source "
        "FROM (SELECT organism FROM lora_adapters UNION SELECT organism FROM completions) o "
        "LEFT JOIN lora_adapters a USING (organism) LEFT JOIN organism_sources s USING (organism)"
    )
    return {r["organism"]: r for r in rows.iter_rows(named=True)}
