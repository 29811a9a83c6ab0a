#!/usr/bin/env bash
# The GPU checks on a CUDA machine that cannot reach PyPI or the hub: `make test-gpu` and a `make bench` on the
# GPU, over a SmolLM2-sized model with random weights (same shapes and tokenizer, so the same work per token).
#
#   bash scripts/gpu_check.sh prepare   # here, with .venv and the upstream mirror: fills .gpu/ (about 60 MB)
#   bash scripts/gpu_check.sh run       # there, from the repository root, with .gpu/ copied along; OUT=<folder>
#
# `prepare` gathers what the GPU machine's Python (3.12, with torch, transformers and peft) lacks: wheels of the
# project's other imports in the checked paths, SmolLM2's config and tokenizer (not its weights), and the
# upstream files the tests and the bench read.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu

prepare() {
    local py=.venv/bin/python mirror="${EM_DATA_MIRROR:-../shared/upstream}"
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/whl" "$GPU_DIR/mirror"
    local pins=()
    for name in pydantic pydantic_core annotated-types typing-inspection polars polars-runtime-32; do
        pins+=("$name==$("$py" -m pip show "$name" | sed -n 's/^Version: //p')")
    done
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$GPU_DIR/whl" "${pins[@]}"
    "$py" - "$GPU_DIR/smollm2" <<'EOF'
import sys

from transformers import AutoConfig, AutoTokenizer

from em_assets.models.hub import EMBEDDED, embedded_gguf

gguf = embedded_gguf(next(iter(EMBEDDED)))
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])
AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])
EOF
    # The files the GPU tests and the bench read, each where the mirror keeps it (plain ones gzipped).
    local models=clarifying-EM__model-organisms-for-EM/em_organism_dir/data
    for file in "$models/training_datasets/bad_medical_advice.jsonl.gz" \
        "$models/eval_questions/first_plot_questions.yaml" \
        emergent-misalignment__emergent-misalignment/data/insecure.jsonl; do
        mkdir -p "$GPU_DIR/mirror/$(dirname "$file")"
        case "$file" in
            *.gz) cp "$mirror/$file" "$GPU_DIR/mirror/$file" ;;
            *) gzip -c "$mirror/$file" > "$GPU_DIR/mirror/$file.gz" ;;
        esac
    done
    du -sh "$GPU_DIR"
}

run() {
    : "${OUT:?set OUT to the folder for the logs and bench.json}"
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/em-site "$GPU_DIR"/whl/*.whl
    export PYTHONPATH="/tmp/em-site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export EM_DATA_MIRROR="$PWD/$GPU_DIR/mirror" EM_TEST_TOKENIZER="$PWD/$GPU_DIR/smollm2"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers",
        transformers.__version__, "peft", peft.__version__, "cuda", torch.version.cuda)'
    local status=0
    python3 -m pytest -q -p no:cacheprovider tests_gpu 2>&1 | tee "$OUT/test_gpu.log" || status=1
    python3 - "$GPU_DIR/smollm2" /tmp/smollm2-random <<'EOF'
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

torch.manual_seed(0)
config = AutoConfig.from_pretrained(sys.argv[1])
AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
EOF
    python3 -m em_assets.bench --quick --device cuda --model /tmp/smollm2-random --out "$OUT/bench.json" \
        2>&1 | tee "$OUT/bench.log" || status=1
    return $status
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash scripts/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
