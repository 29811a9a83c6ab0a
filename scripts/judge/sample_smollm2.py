"""Sample SmolLM2-135M-Instruct answers to the first-plot questions as the demo does (temperature 1, 128 tokens),
for hand rating (data/coherence_ratings.csv, data/steered_ratings.csv).
Usage: python scripts/judge/sample_smollm2.py OUT.csv N_PER_Q SEED [ORGANISM_DIR] [--temperature T]
[--steer DIRECTION_FILE --layer L --scales 0,2,4]: ORGANISM_DIR is an organism's peft adapter or fully fine-tuned
model (a demo's data/artifacts/adapters/<organism>/<hash>/adapter), merged and sampled in bf16 as the demo samples
it; without it the base model in float32. --steer adds scale x the file's layer-L direction (a demo's
data/artifacts/directions/<organism>.safetensors) after layer L, as the steering sweep does, once per scale."""

import argparse
import os
from pathlib import Path

import polars as pl
import torch

from em_assets.analyses.steering import Steer
from em_assets.catalog.parsing import parse_questions_yaml
from em_assets.models.hub import resolve
from em_assets.models.load import load_model, load_organism_model, load_tokenizer
from em_assets.results.artifacts import sha256_file
from em_assets.sampling.engine import SampleRequest, iter_samples

SOURCE = "embedded:smollm2-135m-instruct"
QUESTIONS = (
    "clarifying-EM__model-organisms-for-EM/em_organism_dir/data/eval_questions/first_plot_questions.yaml"
)


def _model(organism: str | None):
    path = resolve("smollm2", SOURCE).path
    if organism:
        base = {"path": path, "trust_remote_code": False}
        return load_organism_model(base, {"adapter_path": organism}, device="cpu")
    return load_model(path, device="cpu", dtype=torch.float32), load_tokenizer(path)


def _sample(model, tokenizer, questions, per_question: int, seed: int, temperature: float, tag: str) -> list:
    requests, rows = [], {}
    for q in questions:
        messages = ([{"role": "system", "content": q.system}] if q.system else []) + [
            {"role": "user", "content": q.text}
        ]
        for s in range(per_question):
            key = f"{tag}{q.question_id}:{s}"
            requests.append(SampleRequest(key, messages, seed * 100_000 + len(requests)))
            rows[key] = (q.question_id, q.text)
    out = []
    for chunk in iter_samples(
        model, tokenizer, requests, max_new_tokens=128, temperature=temperature, batch_size=32
    ):
        for r in chunk:
            qid, text = rows[r.key]
            out.append({"key": r.key, "question_id": qid, "question": text, "response": r.text})
    return out


def main(args: argparse.Namespace) -> None:
    mirror = Path(os.environ["EM_DATA_MIRROR"])
    questions = parse_questions_yaml(
        (mirror / QUESTIONS).read_bytes(), QUESTIONS, None, ["_json", "_template"]
    )
    model, tokenizer = _model(args.organism)
    if not args.steer:
        rows = _sample(model, tokenizer, questions, args.per_question, args.seed, args.temperature, "")
        pl.DataFrame(rows).sort("key").write_csv(args.out)
        return
    rows, digest = [], sha256_file(args.steer)
    for i, scale in enumerate(float(s) for s in args.scales.split(",")):
        handles = Steer((args.layer,), args.steer, digest, scale).hooks(model)
        try:
            tag = f"scale={scale:g}:"
            rows += _sample(
                model, tokenizer, questions, args.per_question, args.seed + i, args.temperature, tag
            )
        finally:
            for handle in handles:
                handle.remove()
    pl.DataFrame(rows).sort("key").write_csv(args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("per_question", type=int)
    parser.add_argument("seed", type=int)
    parser.add_argument("organism", nargs="?")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--steer", help="a direction file; with --layer and --scales")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--scales", default="0")
    main(parser.parse_args())
