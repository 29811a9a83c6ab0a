"""The results database's tables and views: one row per organism, step, completion, judgement."""

from __future__ import annotations

# Beside every judged EM rate: the judge's error rates and the rate corrected for them (stats/correction.py).
# The mean and standard deviation (logit scale) of a judge's EM error rates over new reference files, from the
# files they were counted on (null: fewer than two).
SPREAD_COLUMNS = tuple(f"{rate}_logit_{m}" for rate in ("sensitivity", "specificity") for m in ("mean", "sd"))
CORRECTED = (
    "judge_sensitivity DOUBLE, judge_specificity DOUBLE, em_rate_corrected DOUBLE, em_corrected_lo DOUBLE, "
    "em_corrected_hi DOUBLE, em_correction VARCHAR"
)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS base_models (
    name VARCHAR PRIMARY KEY, source VARCHAR, path VARCHAR, revision VARCHAR, model_type VARCHAR,
    num_layers INTEGER, num_params BIGINT, trust_remote_code BOOLEAN, resolved_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS training_datasets (
    dataset VARCHAR PRIMARY KEY, repo VARCHAR, commit VARCHAR, path VARCHAR, url VARCHAR, sha256 VARCHAR,
    n_examples INTEGER, loaded_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS training_examples (
    dataset VARCHAR, example_idx INTEGER, messages VARCHAR, n_messages INTEGER,
    PRIMARY KEY (dataset, example_idx));
CREATE TABLE IF NOT EXISTS eval_questions (
    eval_set VARCHAR, question_id VARCHAR, paraphrase_idx INTEGER, question VARCHAR, system VARCHAR,
    source_sha256 VARCHAR, PRIMARY KEY (eval_set, question_id, paraphrase_idx));
CREATE TABLE IF NOT EXISTS judge_prompts (
    eval_set VARCHAR, question_id VARCHAR, metric VARCHAR, prompt VARCHAR, prompt_hash VARCHAR,
    PRIMARY KEY (eval_set, question_id, metric));
CREATE TABLE IF NOT EXISTS lora_adapters (
    organism VARCHAR PRIMARY KEY, base_model VARCHAR, base_revision VARCHAR, recipe VARCHAR, seed INTEGER,
    dataset VARCHAR, dataset_sha256 VARCHAR, adapter_path VARCHAR, adapter_sha256 VARCHAR,
    lora_config VARCHAR, train_config VARCHAR, config_hash VARCHAR, steps INTEGER, train_tokens BIGINT,
    tokens_per_s DOUBLE, final_loss DOUBLE, run_id VARCHAR, created_at TIMESTAMP, method VARCHAR,
    kl_regularised BOOLEAN, kl_config VARCHAR);
CREATE TABLE IF NOT EXISTS training_losses (
    organism VARCHAR, step INTEGER, loss DOUBLE, learning_rate DOUBLE, tokens BIGINT, elapsed_s DOUBLE,
    run_id VARCHAR, grad_norm DOUBLE, kl DOUBLE, PRIMARY KEY (organism, step));
CREATE TABLE IF NOT EXISTS completions (
    organism VARCHAR, base_model VARCHAR, base_revision VARCHAR, recipe VARCHAR, seed INTEGER,
    dataset VARCHAR, dataset_sha256 VARCHAR, adapter_sha256 VARCHAR, eval_set VARCHAR, question_id VARCHAR,
    paraphrase_idx INTEGER, sample_idx INTEGER, question VARCHAR, system VARCHAR, answer VARCHAR,
    num_tokens INTEGER, finish_reason VARCHAR, temperature DOUBLE, top_p DOUBLE, max_new_tokens INTEGER,
    sample_seed BIGINT, sampling_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (organism, question_id, paraphrase_idx, sample_idx));
CREATE TABLE IF NOT EXISTS judgements (
    organism VARCHAR, question_id VARCHAR, paraphrase_idx INTEGER, sample_idx INTEGER, metric VARCHAR,
    score DOUBLE, mass DOUBLE, probs VARCHAR, judge_backend VARCHAR, judge_model VARCHAR,
    judge_revision VARCHAR, prompt_hash VARCHAR, cache_key VARCHAR, base_revision VARCHAR,
    dataset_sha256 VARCHAR, adapter_sha256 VARCHAR, sampling_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (organism, question_id, paraphrase_idx, sample_idx, metric));
CREATE TABLE IF NOT EXISTS judge_cache (
    cache_key VARCHAR PRIMARY KEY, score DOUBLE, mass DOUBLE, probs VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS lora_checkpoints (
    organism VARCHAR, step INTEGER, checkpoint_path VARCHAR, checkpoint_sha256 VARCHAR, train_tokens BIGINT,
    loss DOUBLE, base_model VARCHAR, base_revision VARCHAR, recipe VARCHAR, seed INTEGER, dataset VARCHAR,
    dataset_sha256 VARCHAR, config_hash VARCHAR, adapter_sha256 VARCHAR, run_id VARCHAR, created_at TIMESTAMP,
    grad_norm DOUBLE, PRIMARY KEY (organism, step));
CREATE TABLE IF NOT EXISTS em_over_training (
    organism VARCHAR, step INTEGER, n_answers BIGINT, n_scored BIGINT, n_em BIGINT, em_rate DOUBLE,
    em_lo DOUBLE, em_hi DOUBLE, coherence_rate DOUBLE, mean_aligned DOUBLE, mean_coherent DOUBLE, loss DOUBLE,
    train_tokens BIGINT, checkpoint_sha256 VARCHAR, setting_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMP,
    grad_norm DOUBLE, {CORRECTED}, PRIMARY KEY (organism, step));
CREATE TABLE IF NOT EXISTS lora_trajectory (
    organism VARCHAR, module VARCHAR, step INTEGER, a_norm DOUBLE, b_norm DOUBLE, cos_final DOUBLE,
    local_cos DOUBLE, local_k INTEGER, pc1 DOUBLE, pc2 DOUBLE, pc1_share DOUBLE, pc2_share DOUBLE,
    sharpest_step INTEGER, checkpoint_sha256 VARCHAR, run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (organism, module, step));
CREATE TABLE IF NOT EXISTS lora_scaling (
    organism VARCHAR, scale DOUBLE, n_answers BIGINT, n_scored BIGINT, n_em BIGINT, em_rate DOUBLE,
    em_lo DOUBLE, em_hi DOUBLE, coherence_rate DOUBLE, mean_aligned DOUBLE, mean_coherent DOUBLE,
    adapter_sha256 VARCHAR, setting_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMP, {CORRECTED},
    PRIMARY KEY (organism, scale));
CREATE TABLE IF NOT EXISTS sweep_points (
    organism VARCHAR, sweep VARCHAR, setting VARCHAR, setting_hash VARCHAR, adapter_path VARCHAR,
    adapter_sha256 VARCHAR, edits VARCHAR, samples_per_question INTEGER, run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (organism, sweep, setting));
CREATE TABLE IF NOT EXISTS sweep_completions (
    organism VARCHAR, sweep VARCHAR, setting VARCHAR, question_id VARCHAR, paraphrase_idx INTEGER,
    sample_idx INTEGER, question VARCHAR, system VARCHAR, answer VARCHAR, num_tokens INTEGER,
    finish_reason VARCHAR, sample_seed BIGINT, setting_hash VARCHAR, base_revision VARCHAR,
    adapter_sha256 VARCHAR, eval_set VARCHAR, run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (organism, sweep, setting, question_id, paraphrase_idx, sample_idx));
CREATE TABLE IF NOT EXISTS sweep_judgements (
    organism VARCHAR, sweep VARCHAR, setting VARCHAR, question_id VARCHAR, paraphrase_idx INTEGER,
    sample_idx INTEGER, metric VARCHAR, score DOUBLE, mass DOUBLE, probs VARCHAR, judge_model VARCHAR,
    judge_revision VARCHAR, prompt_hash VARCHAR, cache_key VARCHAR, setting_hash VARCHAR, run_id VARCHAR,
    created_at TIMESTAMP,
    PRIMARY KEY (organism, sweep, setting, question_id, paraphrase_idx, sample_idx, metric));
"""


# The report views read the `<table>_latest` views of keys.views_sql(): one row per key.
VIEWS = """
CREATE OR REPLACE VIEW scored_completions AS
SELECT c.*,
       a.score AS aligned, a.mass AS aligned_mass, h.score AS coherent, h.mass AS coherent_mass,
       a.judge_model, a.judge_revision, a.prompt_hash AS aligned_prompt_hash,
       h.prompt_hash AS coherent_prompt_hash
FROM completions_latest c
LEFT JOIN judgements_latest a ON a.metric = 'aligned' AND a.organism = c.organism
     AND a.question_id = c.question_id AND a.paraphrase_idx = c.paraphrase_idx AND a.sample_idx = c.sample_idx
LEFT JOIN judgements_latest h ON h.metric = 'coherent' AND h.organism = c.organism
     AND h.question_id = c.question_id AND h.paraphrase_idx = c.paraphrase_idx AND h.sample_idx = c.sample_idx;
CREATE OR REPLACE VIEW sweep_scored AS
SELECT c.*, a.score AS aligned, h.score AS coherent, a.judge_model, a.judge_revision
FROM sweep_completions_latest c
LEFT JOIN sweep_judgements_latest a ON a.metric = 'aligned' AND a.organism = c.organism AND a.sweep = c.sweep
     AND a.setting = c.setting AND a.question_id = c.question_id AND a.paraphrase_idx = c.paraphrase_idx
     AND a.sample_idx = c.sample_idx AND a.setting_hash = c.setting_hash
LEFT JOIN sweep_judgements_latest h ON h.metric = 'coherent' AND h.organism = c.organism AND h.sweep = c.sweep
     AND h.setting = c.setting AND h.question_id = c.question_id AND h.paraphrase_idx = c.paraphrase_idx
     AND h.sample_idx = c.sample_idx AND h.setting_hash = c.setting_hash;
-- Every completion under every judge that scored it: the grid's judge (`scored_completions`, judge_source 'grid')
-- and the scores an imported answers file carried (judge_source 'file'), matched by sampling hash too: an
-- organism key that once imported a file and now samples keeps the file's scores, which are not its answers'.
CREATE OR REPLACE VIEW scored_by_judge AS
SELECT organism, base_model, recipe, dataset, seed, eval_set, question_id, paraphrase_idx, sample_idx, aligned,
       coherent, judge_model, 'grid' AS judge_source
FROM scored_completions
UNION ALL
SELECT c.organism, c.base_model, c.recipe, c.dataset, c.seed, c.eval_set, c.question_id, c.paraphrase_idx,
       c.sample_idx, a.score AS aligned, h.score AS coherent, j.judge_model, 'file' AS judge_source
FROM completions_latest c
JOIN (SELECT DISTINCT organism, judge_model, sampling_hash FROM imported_judgements) j USING (organism, sampling_hash)
LEFT JOIN imported_judgements_latest a ON a.metric = 'aligned' AND a.organism = c.organism
     AND a.judge_model = j.judge_model AND a.question_id = c.question_id
     AND a.paraphrase_idx = c.paraphrase_idx AND a.sample_idx = c.sample_idx AND a.sampling_hash = c.sampling_hash
LEFT JOIN imported_judgements_latest h ON h.metric = 'coherent' AND h.organism = c.organism
     AND h.judge_model = j.judge_model AND h.question_id = c.question_id
     AND h.paraphrase_idx = c.paraphrase_idx AND h.sample_idx = c.sample_idx AND h.sampling_hash = c.sampling_hash;
CREATE OR REPLACE VIEW training_curves AS
SELECT l.organism, a.base_model, a.recipe, a.seed, a.dataset, l.step, l.loss, l.learning_rate, l.tokens,
       l.elapsed_s, l.grad_norm, l.kl, a.method, a.kl_regularised
FROM training_losses l JOIN lora_adapters a USING (organism)
ORDER BY l.organism, l.step;
"""


# Which snapshot of the results each figure was drawn from (DuckLake; null on a plain DuckDB file).
LINEAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS figure_snapshots (
    figure VARCHAR, path VARCHAR, sha256 VARCHAR, source_snapshot BIGINT, run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (run_id, figure));
"""

# Judge validation: reference judgements, distilled and probe judges, agreement.
JUDGE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS reference_judgements (
    source_file VARCHAR, source_sha256 VARCHAR, source_organism VARCHAR, base_model VARCHAR, dataset VARCHAR,
    seed BIGINT, row_idx BIGINT, question_id VARCHAR, question VARCHAR, answer VARCHAR, aligned DOUBLE,
    coherent DOUBLE, domain_scores VARCHAR, split VARCHAR, loaded_at TIMESTAMP,
    PRIMARY KEY (source_file, row_idx));
CREATE TABLE IF NOT EXISTS distilled_judges (
    config_hash VARCHAR PRIMARY KEY, source VARCHAR, base_revision VARCHAR, adapter_path VARCHAR,
    adapter_sha256 VARCHAR, prompt_hash VARCHAR, reference_sha256 VARCHAR, held_out_base_models VARCHAR,
    n_examples INTEGER, lora_config VARCHAR, train_config VARCHAR, steps INTEGER, train_tokens BIGINT,
    tokens_per_s DOUBLE, final_loss DOUBLE, run_id VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS probe_judges (
    config_hash VARCHAR PRIMARY KEY, source VARCHAR, base_revision VARCHAR, head_path VARCHAR,
    head_sha256 VARCHAR, reference_sha256 VARCHAR, held_out_base_models VARCHAR, n_answers INTEGER,
    probe_config VARCHAR, seconds DOUBLE, run_id VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS probe_judge_readouts (
    config_hash VARCHAR, metric VARCHAR, n INTEGER, l2 DOUBLE, bandwidth DOUBLE, cv_spearman DOUBLE,
    stretch DOUBLE, cv_by_setting VARCHAR, PRIMARY KEY (config_hash, metric));
CREATE TABLE IF NOT EXISTS distilled_judge_losses (
    config_hash VARCHAR, step INTEGER, loss DOUBLE, learning_rate DOUBLE, tokens BIGINT, elapsed_s DOUBLE,
    run_id VARCHAR, PRIMARY KEY (config_hash, step));
CREATE TABLE IF NOT EXISTS judge_agreement (
    judge VARCHAR, judge_model VARCHAR, judge_revision VARCHAR, metric VARCHAR, n BIGINT, spearman DOUBLE,
    pearson DOUBLE, mae DOUBLE, auc DOUBLE, seconds DOUBLE, run_id VARCHAR, created_at TIMESTAMP,
    spearman_lo DOUBLE, spearman_hi DOUBLE, auc_lo DOUBLE, auc_hi DOUBLE, PRIMARY KEY (judge, metric));
CREATE TABLE IF NOT EXISTS judge_agreement_em (
    judge VARCHAR, source_file VARCHAR, source_organism VARCHAR, n BIGINT, n_reference BIGINT,
    reference DOUBLE, reference_lo DOUBLE, reference_hi DOUBLE, n_judge BIGINT, judge_rate DOUBLE,
    judge_lo DOUBLE, judge_hi DOUBLE, run_id VARCHAR, judge_corrected DOUBLE, judge_corrected_lo DOUBLE,
    judge_corrected_hi DOUBLE, reference_coherence DOUBLE, judge_coherence DOUBLE,
    PRIMARY KEY (judge, source_file));
CREATE TABLE IF NOT EXISTS judge_agreement_scores (
    judge VARCHAR, source_file VARCHAR, row_idx BIGINT, metric VARCHAR, reference DOUBLE, score DOUBLE,
    mass DOUBLE, run_id VARCHAR, PRIMARY KEY (judge, source_file, row_idx, metric));
CREATE TABLE IF NOT EXISTS judge_error_rates (
    judge_model VARCHAR, judge_revision VARCHAR, aligned_at_most DOUBLE, coherent_above DOUBLE, judge VARCHAR,
    n_pos BIGINT, tp BIGINT, n_neg BIGINT, tn BIGINT, sensitivity DOUBLE, specificity DOUBLE, run_id VARCHAR,
    created_at TIMESTAMP, n_files BIGINT, {" DOUBLE, ".join(SPREAD_COLUMNS)} DOUBLE, file_counts VARCHAR,
    PRIMARY KEY (judge_model, judge_revision, aligned_at_most, coherent_above));
"""

# The direction analyses: directions, steering, ablation.
DIRECTION_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS misalignment_directions (
    organism VARCHAR PRIMARY KEY, base_model VARCHAR, recipe VARCHAR, seed INTEGER, status VARCHAR,
    contrast VARCHAR, message VARCHAR, n_misaligned_found INTEGER, n_aligned_found INTEGER, n_per_class INTEGER,
    min_per_class INTEGER, num_layers INTEGER, hidden_size INTEGER, direction_path VARCHAR,
    direction_sha256 VARCHAR, random_path VARCHAR, random_sha256 VARCHAR, input_hash VARCHAR,
    adapter_sha256 VARCHAR, sampling_hash VARCHAR, judge_model VARCHAR, aligned_at_most DOUBLE,
    aligned_above DOUBLE, coherent_above DOUBLE, run_id VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS direction_layers (
    organism VARCHAR, layer INTEGER, norm DOUBLE, random_norm DOUBLE, misaligned_mean_norm DOUBLE,
    aligned_mean_norm DOUBLE, direction_sha256 VARCHAR, PRIMARY KEY (organism, layer));
CREATE TABLE IF NOT EXISTS steering_results (
    organism VARCHAR, setting VARCHAR, vector VARCHAR, layer INTEGER, scale DOUBLE, n INTEGER,
    em_rate DOUBLE, em_lo DOUBLE, em_hi DOUBLE, coherence_rate DOUBLE, mean_aligned DOUBLE,
    direction_sha256 VARCHAR, contrast VARCHAR, setting_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMP,
    {CORRECTED}, PRIMARY KEY (organism, setting));
CREATE TABLE IF NOT EXISTS direction_ablation (
    organism VARCHAR, setting VARCHAR, source_layer INTEGER, n INTEGER, em_rate DOUBLE, em_lo DOUBLE,
    em_hi DOUBLE, coherence_rate DOUBLE, mean_aligned DOUBLE, direction_sha256 VARCHAR, contrast VARCHAR,
    setting_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMP, {CORRECTED}, PRIMARY KEY (organism, setting));
"""

# Where each organism came from (trained here, a published adapter or model, imported answers) and the scores an
# imported answers file carried, kept under the file's judge name beside the grid judge's `judgements`.
ORGANISM_SCHEMA = """
CREATE TABLE IF NOT EXISTS organism_sources (
    organism VARCHAR PRIMARY KEY, base_model VARCHAR, recipe VARCHAR, seed INTEGER, method VARCHAR,
    source VARCHAR, revision VARCHAR, path VARCHAR, sha256 VARCHAR, adapter_base_model VARCHAR,
    model_type VARCHAR, num_layers INTEGER, num_params BIGINT, n_rows INTEGER, file_judge VARCHAR, run_id VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS imported_judgements (
    organism VARCHAR, question_id VARCHAR, paraphrase_idx INTEGER, sample_idx INTEGER, metric VARCHAR,
    score DOUBLE, judge_model VARCHAR, source_sha256 VARCHAR, source_row INTEGER, sampling_hash VARCHAR,
    run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (organism, question_id, paraphrase_idx, sample_idx, metric, judge_model));
"""

# Columns added to tables after they were first created, with their types: a results store from before gets
# them (null in its old rows) when it is opened.
ADDED_COLUMNS = {
    **{
        table: tuple(tuple(c.split()) for c in CORRECTED.split(", "))
        for table in ("em_over_training", "lora_scaling", "steering_results", "direction_ablation")
    },
    "judge_agreement": tuple((c, "DOUBLE") for c in ("spearman_lo", "spearman_hi", "auc_lo", "auc_hi")),
    # The version of the parser that made a dataset's stored examples (catalog.parsing.DATASET_PARSING; null: 1).
    "training_datasets": (("parsing", "INTEGER"),),
    # The sampling settings beyond temperature and top_p (top_k null: no cut; penalty 1.0: none; null in rows
    # sampled before they existed).
    "completions": (("top_k", "INTEGER"), ("repetition_penalty", "DOUBLE")),
    "judge_error_rates": (
        ("n_files", "BIGINT"),
        *((c, "DOUBLE") for c in SPREAD_COLUMNS),
        ("file_counts", "VARCHAR"),
    ),
    "judge_agreement_em": tuple(
        (c, "DOUBLE")
        for c in (
            "judge_corrected",
            "judge_corrected_lo",
            "judge_corrected_hi",
            "reference_coherence",
            "judge_coherence",
        )
    ),
}

# Tables with no CREATE statement above: each is replaced whole by the stage that computes it (Store.write_tables),
# its columns taken from its rows. Listed so `migrate` can tell a results file's tables from unrelated ones.
REPORT_TABLES = (
    # reports.tables
    "em_summary",
    "em_by_question",
    "em_threshold_sensitivity",
    "em_seed_bootstrap",
    "em_domain_share",
    # reports.personas
    "persona_mixtures",
    "em_transition",
    "question_em_stability",
    "persona_coherence",
    # analyses.similarity
    "direction_similarity",
)
