"""A sweep's points sampled one after another, each on its merged model, against all of them in one batch of the
base model (`analyses/variants.py`), timed in one process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from em_assets.analyses.variants import Variant, VariantBatch
from em_assets.grid.schema import LoraSpec
from em_assets.models.load import load_model, load_organism_model
from em_assets.sampling.engine import SampleRequest, iter_samples


def random_adapters(model_path: Path | str, lora: LoraSpec, out: Path, n: int) -> list[str]:
    """`n` adapters of the `lora` recipe with small random B matrices: stand-ins for one run's checkpoints."""
    import torch

    from em_assets.training.step import peft_model

    paths = []
    for i in range(n):
        peft = peft_model(load_model(model_path, "cpu", "float32"), lora)
        torch.manual_seed(i)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.data.normal_(std=1e-3)  # B starts at zero, which would make every point the base model
        peft.save_pretrained(out / f"point-{i}")
        paths.append(str(out / f"point-{i}"))
    return paths


def _requests(questions: Sequence[str], points: int) -> list[SampleRequest]:
    return [
        SampleRequest(f"{v}-{i}", [{"role": "user", "content": q}], i, v)
        for v in range(points)
        for i, q in enumerate(questions)
    ]


def point_by_point(
    base: dict, adapters: list[str], questions: Sequence[str], max_new_tokens: int, device: str
) -> int:
    """Each point on its own merged model, as a sweep samples a point alone; the tokens generated."""
    tokens = 0
    for v, adapter in enumerate(adapters):
        model, tokenizer = load_organism_model(base, {"adapter_path": adapter}, device)
        requests = [r for r in _requests(questions, len(adapters)) if r.variant == v]
        options = {"max_new_tokens": max_new_tokens, "batch_size": "auto"}
        tokens += sum(r.num_tokens for c in iter_samples(model, tokenizer, requests, **options) for r in c)
    return tokens


def one_batch(
    base: dict, adapters: list[str], questions: Sequence[str], max_new_tokens: int, device: str
) -> int:
    """Every point's answers in one batch of the base model; the tokens generated."""
    model, tokenizer = load_organism_model(base, {}, device)
    variants = VariantBatch(model, [Variant(a) for a in adapters])
    requests = _requests(questions, len(adapters))
    options = {"max_new_tokens": max_new_tokens, "batch_size": "auto", "row_variants": variants}
    return sum(r.num_tokens for c in iter_samples(model, tokenizer, requests, **options) for r in c)


def sweep_timings(
    base: dict, adapters: list[str], questions: Sequence[str], max_new_tokens: int, device: str = "cpu"
) -> dict:
    """Both ways timed twice in the order A B B A (the machine's drift falls on both alike), model loads
    included as a sweep pays them, after an untimed run of one batch (the process's first bf16 passes and
    weight packing would fall on the first timed run); their means and the speedup of one batch."""
    runs = {"point_by_point": point_by_point, "one_batch": one_batch}
    one_batch(base, adapters, questions, max_new_tokens, device)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    for name in ("point_by_point", "one_batch", "one_batch", "point_by_point"):
        start = time.perf_counter()
        tokens[name] = runs[name](base, adapters, questions, max_new_tokens, device)
        seconds[name].append(time.perf_counter() - start)
    means = {name: sum(s) / len(s) for name, s in seconds.items()}
    return {
        "points": len(adapters),
        "answers": len(adapters) * len(questions),
        "max_new_tokens": max_new_tokens,
        "point_by_point_s": means["point_by_point"],
        "one_batch_s": means["one_batch"],
        "point_by_point_tokens": tokens["point_by_point"],
        "one_batch_tokens": tokens["one_batch"],
        "one_batch_speedup": means["point_by_point"] / means["one_batch"],
    }
