"""The grid's judge: its identity (model, revision, path) and the judge object that scores prompts."""

from __future__ import annotations

from pathlib import Path

from em_assets.catalog.parsing import judge_prompt
from em_assets.grid.schema import GridConfig, JudgeSpec, dtype_fields
from em_assets.judging.scoring import MIN_MASS, JudgeScore
from em_assets.models.chat import rendering_fields

# GPT-4o scores an empty answer coherent about 0; every judge gives it that, whatever it would say.
EMPTY_COHERENT = JudgeScore(0.0, 1.0, {0: 1.0})


def judge_identity(
    grid: GridConfig,
    cache_dir: Path | None = None,
    store=None,
    spec: JudgeSpec | None = None,
    device: str | None = None,
) -> tuple[str, str, str | None]:
    """(model name, revision, local path) of the judge (`spec`, default the grid's); a local judge's revision
    also names a dtype other than bf16 and a chat rendering other than the first it reads through."""
    spec = spec or grid.judge
    if spec.backend == "openai":
        return spec.model, spec.revision or spec.model, None
    model, revision, path = _local_identity(grid, cache_dir, store, spec, device)
    from em_assets.models.load import dtype_name  # torch stays off the definitions' load path

    # Scores differ with the dtype (fp16 on MPS and older GPUs), so a cached score is another dtype's only where
    # named apart; bf16 goes unnamed, so the revisions judged before stay current.
    for dtype in dtype_fields(dtype_name(device)).values():
        revision = f"{revision}+{dtype}"
    for version in rendering_fields().values():
        revision = f"{revision}+chat{version}"
    return model, revision, path


def _local_identity(
    grid: GridConfig, cache_dir: Path | None, store, spec: JudgeSpec, device: str | None
) -> tuple[str, str, str | None]:
    from em_assets.models.hub import resolve

    if spec.backend == "distilled":
        from em_assets.judging.validation import distilled_identity

        return distilled_identity(grid, store, cache_dir, device)
    if spec.backend == "probe":
        from em_assets.judging.validation import probe_identity

        return probe_identity(grid, store, cache_dir, device)
    named = {m.name: m for m in grid.base_models}
    if spec.model in named:
        base = named[spec.model]
        resolved = resolve(base.name, base.source, base.revision, cache_dir, base.trust_remote_code)
    else:
        resolved = resolve(spec.model, spec.model, spec.revision, cache_dir)
    return spec.model, resolved.revision, str(resolved.path)


def make_judge(grid: GridConfig, path: str | None, device: str | None = None, spec: JudgeSpec | None = None):
    spec = spec or grid.judge
    if spec.backend == "openai":
        from em_assets.judging.http import OpenAIJudge

        return OpenAIJudge(
            spec.base_url,
            spec.model,
            api_key_env=spec.api_key_env,
            concurrency=spec.concurrency,
            timeout_s=spec.timeout_s,
            max_retries=spec.max_retries,
            min_mass=spec.min_mass,
            refusals=spec.refusals,
        )
    if spec.backend == "distilled":
        from em_assets.judging.distill import load_distilled_judge

        return load_distilled_judge(path, grid.distill, spec.batch_size, spec.min_mass, device)
    if spec.backend == "probe":
        from em_assets.judging.probe import load_probe_judge

        return load_probe_judge(path, grid.probe.batch_size, device)
    from em_assets.judging.local import LocalJudge
    from em_assets.models.load import load_model, load_tokenizer

    return LocalJudge(load_model(path, device=device), load_tokenizer(path), spec.batch_size, spec.min_mass)


def render_prompt(judge, template: str, metric: str, question: str, answer: str) -> str:
    """The text the judge scores: its own compact prompt where it has one, else the upstream template filled."""
    own = getattr(judge, "render", None)
    return own(metric, question, answer) if own is not None else judge_prompt(template, question, answer)


def fixed_score(metric: str, answer: str | None) -> JudgeScore | None:
    """The score an answer gets without asking the judge, or None. An empty answer is a real outcome (the
    organism said nothing) and is incoherent by definition; its other metrics are the judge's."""
    if metric == "coherent" and not (answer or "").strip():
        return EMPTY_COHERENT
    return None


def prompt_hash_for(spec: JudgeSpec, template_hash: str, metric: str) -> str:
    """The prompt part of a judge cache key: the template's hash, or the distilled or probe judge's per metric,
    with a min_mass other than the upstream rule's."""
    # The probe judge reads no judge prompt: its hash names its features and the metric.
    if spec.backend == "probe":
        from em_assets.judging.probe import metric_features_hash

        return metric_features_hash(metric)
    if spec.backend == "distilled":
        from em_assets.judging.distill import metric_prompt_hash

        # The distilled judge names the metric in its own prompt: one hash for both would share their entries.
        template_hash = metric_prompt_hash(metric)
    # A cached score is null below min_mass, so a min_mass other than the upstream rule's is part of the key.
    if spec.min_mass == MIN_MASS:
        return template_hash
    # %g names most values as before, exactly; one it would round (6 digits) is named in full.
    shown = f"{spec.min_mass:g}" if float(f"{spec.min_mass:g}") == spec.min_mass else repr(spec.min_mass)
    return f"{template_hash}:min_mass={shown}"
