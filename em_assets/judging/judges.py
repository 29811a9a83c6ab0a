"""The grid's judge: its identity (model, revision, path) and the judge object that scores prompts."""

from __future__ import annotations

from pathlib import Path

from em_assets.grid.schema import GridConfig


def judge_identity(grid: GridConfig, cache_dir: Path | None = None) -> tuple[str, str, str | None]:
    """(model name, revision, local path) of the judge: a grid base model, any model source, or an API model."""
    from em_assets.models.hub import resolve

    spec = grid.judge
    if spec.backend == "openai":
        return spec.model, spec.revision or spec.model, None
    named = {m.name: m for m in grid.base_models}
    if spec.model in named:
        base = named[spec.model]
        resolved = resolve(base.name, base.source, base.revision, cache_dir)
    else:
        resolved = resolve(spec.model, spec.model, spec.revision, cache_dir)
    return spec.model, resolved.revision, str(resolved.path)


def make_judge(grid: GridConfig, path: str | None, device: str | None = None):
    spec = grid.judge
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
        )
    from em_assets.judging.local import LocalJudge
    from em_assets.models.load import load_model, load_tokenizer

    return LocalJudge(load_model(path, device=device), load_tokenizer(path), spec.batch_size, spec.min_mass)
