"""Sample SmolLM2-135M-Instruct answers to the first-plot questions as the demo does (temperature 1, 128 tokens),
for hand rating (data/coherence_ratings.csv).
Usage: python scripts/judge/sample_smollm2.py OUT.csv N_PER_Q SEED [ORGANISM_DIR]: an organism's peft adapter or
fully fine-tuned model (a demo's data/artifacts/adapters/<organism>/<hash>/adapter), merged and sampled in bf16
as the demo samples it; without it the base model in float32."""

import sys
from pathlib import Path

import polars as pl
import torch

from em_assets.catalog.parsing import parse_questions_yaml
from em_assets.models.hub import resolve
from em_assets.models.load import load_model, load_organism_model, load_tokenizer
from em_assets.sampling.engine import SampleRequest, iter_samples

SOURCE = "embedded:smollm2-135m-instruct"
QUESTIONS = (
    "clarifying-EM__model-organisms-for-EM/em_organism_dir/data/eval_questions/first_plot_questions.yaml"
)


def main(out: str, per_question: int, seed: int, organism: str | None = None) -> None:
    mirror = Path(__import__("os").environ["EM_DATA_MIRROR"])
    questions = parse_questions_yaml(
        (mirror / QUESTIONS).read_bytes(), QUESTIONS, None, ["_json", "_template"]
    )
    path = resolve("smollm2", SOURCE).path
    if organism:
        base = {"path": path, "trust_remote_code": False}
        model, tokenizer = load_organism_model(base, {"adapter_path": organism}, device="cpu")
    else:
        model, tokenizer = load_model(path, device="cpu", dtype=torch.float32), load_tokenizer(path)
    requests, rows = [], {}
    for q in questions:
        messages = ([{"role": "system", "content": q.system}] if q.system else []) + [
            {"role": "user", "content": q.text}
        ]
        for s in range(per_question):
            key = f"{q.question_id}:{s}"
            requests.append(SampleRequest(key, messages, seed * 100_000 + len(requests)))
            rows[key] = (q.question_id, q.text)
    out_rows = []
    for chunk in iter_samples(model, tokenizer, requests, max_new_tokens=128, temperature=1.0, batch_size=32):
        for r in chunk:
            qid, text = rows[r.key]
            out_rows.append({"key": r.key, "question_id": qid, "question": text, "response": r.text})
    pl.DataFrame(out_rows).sort("key").write_csv(out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
