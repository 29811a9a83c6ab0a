"""Experiment: how far the shipped misalignment direction (each answer's mean over its own answer tokens, answers
weighed equally) is from the clarifying-EM code's (`util/activation_collection.py`: one mean over all of a class's
answer tokens, its span everything after the user turn, so the assistant turn's template tokens too). For each
organism of the store with a direction file: the stage's contrast rebuilt (same answers, seed and model; its input
hash compared with the stored row's), then per layer cosine(shipped, upstream), |upstream| / |shipped|, each one's
cosine with the stored file, and the two halves of the difference apart (token weighting on the answer's own
tokens; the wider span with answers weighed equally). Reads the store and artifacts the settings name; writes
nothing.
Usage: EM_DB=... EM_ARTIFACTS_DIR=... EM_GRID=... python scripts/directions/upstream_weighting.py [organism ...]"""

import sys
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import load_file

from em_assets.analyses.directions import _answers, _input_hash, compute_direction, select_contrast
from em_assets.context import StageContext
from em_assets.grid.load import load_grid
from em_assets.grid.schema import Organism, layer_at
from em_assets.models.activations import JudgedAnswer, _layer_sums, iter_answer_means
from em_assets.models.chat import chat_ids
from em_assets.models.load import dtype_name, load_organism_model
from em_assets.models.packed import packed_linears
from em_assets.results import directions as db
from em_assets.results.artifacts import sha256_file
from em_assets.results.queries import organism_model_row
from em_assets.results.store import Store
from em_assets.settings import settings, torch_device


def upstream_span(tokenizer, item: JudgedAnswer) -> tuple[list[int], int]:
    """The conversation with the answer as the assistant turn (no generation prompt), and where the user turn
    rendered alone ends: upstream's answer span starts there, so it holds the assistant turn's template tokens."""
    full = chat_ids(tokenizer, [*item.messages, {"role": "assistant", "content": item.answer}], False)
    prompt = chat_ids(tokenizer, item.messages, False)
    # Upstream splits by count alone; where the prompt's tokens are not the conversation's first, the span is not
    # what it says.
    if full[: len(prompt)] != prompt:
        raise ValueError(f"the user turn alone does not tokenize as the conversation starts: {item.messages}")
    return full, len(prompt)


@torch.inference_mode()
def span_sums(
    model, tokenizer, items: list[JudgedAnswer], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[answers, layers, hidden] float32 sums over each answer's upstream span, and each span's token count."""
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums, counts = [], []
    with packed_linears(model):
        for start in range(0, len(items), batch_size):
            encoded = [upstream_span(tokenizer, it) for it in items[start : start + batch_size]]
            width = max(len(ids) for ids, _ in encoded)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in encoded], device=device)
            cols = torch.arange(width, device=device)
            lengths = torch.tensor([len(i) for i, _ in encoded], device=device)
            begins = torch.tensor([b for _, b in encoded], device=device)
            span = ((cols[None, :] >= begins[:, None]) & (cols[None, :] < lengths[:, None])).float()
            sums.append(_layer_sums(model, ids, (cols[None, :] < lengths[:, None]).long(), span).cpu())
            counts.append(span.sum(dim=1).cpu())
    return torch.cat(sums), torch.cat(counts)


def own_token_weighted(model, tokenizer, items: list[JudgedAnswer], batch_size: int) -> torch.Tensor:
    """[layers, hidden]: the mean over all of the answers' own tokens together (the shipped span, upstream's
    weighting)."""
    means = torch.cat([m.cpu() for m in iter_answer_means(model, tokenizer, items, batch_size)])
    counts = torch.tensor([len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items])
    print(f"  answer tokens per answer: {counts.tolist()}")
    return (means * counts[:, None, None]).sum(0) / counts.sum()


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def variants(model, tokenizer, contrast, batch_size: int) -> dict[str, torch.Tensor]:
    """[layers, hidden] directions: shipped, upstream, and each of upstream's two changes alone."""
    sides = {"mis": _answers(contrast.misaligned), "ali": _answers(contrast.aligned)}
    out = {"shipped": compute_direction(model, tokenizer, contrast, batch_size)["direction"].cpu()}
    spans = {k: span_sums(model, tokenizer, v, batch_size) for k, v in sides.items()}
    out["upstream"] = (
        spans["mis"][0].sum(0) / spans["mis"][1].sum() - spans["ali"][0].sum(0) / spans["ali"][1].sum()
    )
    # Upstream's span with each answer weighed the same: what the wider span alone changes.
    per_answer = {k: (s / c[:, None, None]).mean(0) for k, (s, c) in spans.items()}
    out["span_only"] = per_answer["mis"] - per_answer["ali"]
    tokens = {k: own_token_weighted(model, tokenizer, v, batch_size) for k, v in sides.items()}
    out["tokens_only"] = tokens["mis"] - tokens["ali"]
    return out


def measure(store: Store, grid, row: dict) -> pl.DataFrame:
    """One organism's per-layer comparison, after checking the rebuilt contrast is the stage's."""
    current = settings()
    ctx = StageContext(
        store,
        grid,
        Organism.parse(row["organism"]),
        "upstream_weighting",
        current.artifacts_dir,
        device=torch_device(current.device),
    )
    scored = db.scored_answers(store, ctx.key).filter(pl.col("eval_set") == grid.eval.questions)
    contrast = select_contrast(scored, grid.thresholds, grid.directions, ctx.organism.seed)
    adapter, base = ctx.current_adapter(), organism_model_row(store, ctx.key, ctx.organism.base_model)
    dtype = dtype_name(ctx.device)
    same = _input_hash(contrast, adapter, base, ctx, dtype) == row["input_hash"]
    # The stage names its file by the organism under the artifacts folder; the row's path is as the stage saw it.
    path = current.artifacts_dir / "directions" / Path(row["direction_path"]).name
    stored = load_file(str(path))["direction"].float()
    print(
        f"\n{ctx.key}: {contrast.message} ({contrast.kind}); dtype {dtype}; rebuilt input hash "
        f"{'matches' if same else 'DIFFERS from'} the stored row's; file sha256 "
        f"{'matches' if sha256_file(path) == row['direction_sha256'] else 'DIFFERS'}"
    )
    model, tokenizer = load_organism_model(base, adapter, ctx.device)
    v = variants(model, tokenizer, contrast, grid.directions.batch_size)
    return pl.DataFrame(
        {
            "organism": ctx.key,
            "layer": range(stored.shape[0]),
            "cos_shipped_upstream": cos(v["shipped"], v["upstream"]).numpy(),
            "norm_ratio": (v["upstream"].norm(dim=-1) / v["shipped"].norm(dim=-1)).numpy(),
            "cos_shipped_stored": cos(v["shipped"], stored).numpy(),
            "cos_upstream_stored": cos(v["upstream"], stored).numpy(),
            "cos_shipped_tokens_only": cos(v["shipped"], v["tokens_only"]).numpy(),
            "cos_shipped_span_only": cos(v["shipped"], v["span_only"]).numpy(),
        }
    )


def main(names: list[str]) -> None:
    store, grid = Store(), load_grid()
    spec = grid.directions
    organisms = [o for o in db.computed_directions(store)["organism"] if not names or o in names]
    tables = []
    with pl.Config(tbl_rows=-1, tbl_cols=-1, float_precision=4, tbl_width_chars=200):
        for name in organisms:
            row = db.direction_row(store, name)
            table = measure(store, grid, row)
            print(table.drop("organism"))
            fractions = {*spec.layer_fractions, spec.ablation_layer_fraction}
            layers = sorted({layer_at(f, row["num_layers"]) for f in fractions})
            print(f"{name} at the steering and ablation layer(s) {layers}:")
            print(table.filter(pl.col("layer").is_in(layers)).drop("organism"))
            tables.append(table)
        print("\nrange over layers:")
        print(
            pl.concat(tables)
            .group_by("organism", maintain_order=True)
            .agg(
                *(
                    pl.col(c).min().alias(f"{c}_min")
                    for c in ("cos_shipped_upstream", "norm_ratio", "cos_shipped_stored")
                ),
                *(pl.col(c).max().alias(f"{c}_max") for c in ("cos_shipped_upstream", "norm_ratio")),
                (1 - pl.col("cos_shipped_stored")).abs().max().alias("max_1_minus_cos_stored"),
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
