"""`make bench`'s parent: ratios from a results dict, the vLLM peer's skip row, the judge levers' runs.

No child runs here: `_child` and model resolution are stand-ins, so these tests take no measurement."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from em_assets.bench import run
from em_assets.settings import OPENMP_SPIN, OPENMP_WAIT_VARS, PACKED_LINEARS_ENV

REPO = Path(__file__).resolve().parents[2]

PARAMS = 135_000_000


def results(vllm: dict, compact: dict) -> dict:
    # 270 GFLOP/s over 2 x 135M FLOP a token: a ceiling of 1000 tok/s.
    return {
        "matmul": {"gflops": 270.0},
        "sample_hf_b1_fp32": {"tok_per_s": 10.0},
        "sample_ours_b256": {"tok_per_s": 200.0, "workers": 1, "batch_size": 256},
        "sample_ours_b256_x2": {"tok_per_s": 300.0, "workers": 2, "batch_size": 256},
        "sample_vllm_cpu": vllm,
        "judge_local": {"judgements_per_s": 8.0, "mean_prompt_tokens": 440.0},
        "judge_local_no_prefix_reuse": {"judgements_per_s": 4.0, "mean_prompt_tokens": 440.0},
        "judge_compact_prompt": compact,
        "judge_probe": {"judgements_per_s": 20.0, "mean_prompt_tokens": 120.0},
    }


def test_summary_ratios_are_worked_out_from_the_results():
    summary = run.summarise(
        results({"tok_per_s": 150.0}, {"judgements_per_s": 32.0, "mean_prompt_tokens": 80.0}), PARAMS
    )
    expected = {
        "compute_ceiling_tok_per_s": 1000.0,
        "sample_ours_b256_vs_hf_b1": 20.0,
        "sample_ours_b256_of_ceiling": 0.2,
        "sample_vllm_cpu_vs_hf_b1": 15.0,
        # The project's sampler over vLLM: 200 / 150 and 300 / 150.
        "sample_ours_b256_vs_vllm_cpu": 4 / 3,
        "sample_ours_b256_x2_vs_vllm_cpu": 2.0,
        # 8 / 4 from prefix reuse, 32 / 8 from the compact prompt: 8x in all, a third and two thirds of it.
        "judge_prefix_reuse_speedup": 2.0,
        "judge_compact_prompt_speedup": 4.0,
        "judge_total_speedup": 8.0,
        "judge_prefix_reuse_share": 1 / 3,
        "judge_compact_prompt_share": 2 / 3,
        "judge_local_mean_prompt_tokens": 440.0,
        "judge_compact_prompt_mean_prompt_tokens": 80.0,
        # The probe judge against the same baseline: 20 / 4.
        "judge_probe_vs_baseline": 5.0,
        "judge_probe_mean_prompt_tokens": 120.0,
    }
    assert {k: summary[k] for k in expected} == pytest.approx(expected)
    assert not any(k.endswith("_vs_vllm_cpu") for k in summary if not k.startswith("sample_ours_"))


def test_a_compact_prompt_run_without_prefix_reuse_is_compared_with_the_baseline_without_it():
    # As on a GPU: reuse slows the upstream row (8 -> 2 judgements/s) and the compact row runs without it.
    rows = results({"tok_per_s": 150.0}, {"judgements_per_s": 32.0, "share_prefix": 0})
    rows["judge_local"] = {"judgements_per_s": 2.0, "share_prefix": 1}
    rows["judge_local_no_prefix_reuse"] = {"judgements_per_s": 8.0, "share_prefix": 0}
    summary = run.summarise(rows, PARAMS)
    assert summary["judge_compact_prompt_speedup"] == pytest.approx(4.0)
    assert summary["judge_prefix_reuse_speedup"] == pytest.approx(0.25)
    assert summary["judge_total_speedup"] == pytest.approx(4.0)
    # The two levers are not steps of one chain there, so neither is a share of the total.
    assert summary["judge_prefix_reuse_share"] is None and summary["judge_compact_prompt_share"] is None


def test_a_skipped_peer_and_a_failed_run_leave_their_ratios_empty():
    summary = run.summarise(
        results({"stage": "vllm", "skipped": run.VLLM_SKIPPED}, {"error": "killed"}), PARAMS
    )
    assert summary["sample_ours_b256_vs_vllm_cpu"] is None
    assert summary["sample_ours_b256_x2_vs_vllm_cpu"] is None
    assert summary["judge_prefix_reuse_speedup"] == pytest.approx(2.0)
    for key in ("judge_compact_prompt_speedup", "judge_total_speedup", "judge_prefix_reuse_share"):
        assert summary[key] is None


@pytest.fixture
def children(monkeypatch) -> list[dict]:
    """run_all with every child a stand-in that records its arguments as its row."""
    calls: list[dict] = []

    def child(name: str, python: Path | str = sys.executable, env: dict | None = None, **kwargs) -> dict:
        calls.append({"stage": name, "python": str(python), **kwargs})
        if env is not None:
            calls[-1]["env"] = env
        return calls[-1]

    monkeypatch.setattr(run, "_child", child)
    monkeypatch.setattr("em_assets.models.hub.resolve", lambda *_: SimpleNamespace(path=Path("/m/smollm2")))
    monkeypatch.setattr(run, "usable_cpus", lambda: 2)
    return calls


def test_without_the_vllm_interpreter_the_row_says_how_to_get_it(children, monkeypatch, tmp_path):
    monkeypatch.setattr(run, "VLLM_PYTHON", tmp_path / "missing/bin/python")
    out = run.run_all(quick=True)
    assert out["sample_vllm_cpu"] == {
        "stage": "vllm",
        "skipped": "skipped: no .venv-vllm; `make .venv-vllm/.installed`",
    }
    assert "vllm" not in {c["stage"] for c in children}


@pytest.fixture
def vllm_python(monkeypatch, tmp_path) -> Path:
    """A stand-in for .venv-vllm's interpreter: the bench sees the peer installed."""
    python = tmp_path / "bin/python"
    python.parent.mkdir()
    python.touch()
    monkeypatch.setattr(run, "VLLM_PYTHON", python)
    return python


def test_with_the_vllm_interpreter_it_samples_the_same_prompts_there(children, vllm_python):
    given = {"PATH": "/bin"}
    out = run.run_all(quick=True, peer_env=given)
    ours = out["sample_ours_b256"]
    assert out["sample_vllm_cpu"] == {
        "stage": "vllm",
        "python": str(vllm_python),
        "requests": ours["requests"],
        "max_new_tokens": ours["max_new_tokens"],
        "model_path": "/m/smollm2",
        "env": given,
    }
    assert ours["python"] == sys.executable and "env" not in ours
    json.dumps(out)  # the report's rows must serialise


def test_the_judge_levers_run_on_the_same_answers_and_batch(children):
    out = run.run_all(quick=True)
    rows = [
        out[k] for k in ("judge_local", "judge_local_no_prefix_reuse", "judge_compact_prompt", "judge_probe")
    ]
    assert [(r["prompt"], r["share_prefix"]) for r in rows] == [
        ("upstream", 1),
        ("upstream", 0),
        ("compact", 1),
        ("probe", 1),
    ]
    assert len({(r["requests"], r["batch"]) for r in rows}) == 1


def test_on_a_gpu_every_child_runs_there_on_the_given_model_and_cpu_only_rows_are_left_out(
    children, vllm_python, monkeypatch, cpu_bf16
):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # llama.cpp installed
    cpu = run.run_all(quick=True)
    assert "sample_llamacpp_b1" in cpu and "sample_ours_b256_x2" in cpu and "packed_b24" in cpu
    children.clear()
    out = run.run_all(quick=True, device="cuda")
    assert {c.get("device") for c in children} == {"cuda"} and "vllm" not in {c["stage"] for c in children}
    # Processes per core, packed CPU weights, llama.cpp's and vLLM's CPU builds are a CPU's levers and peers.
    assert not [k for k in out if "packed" in k or "_x2" in k or "llamacpp" in k]
    assert out["sample_vllm_cpu"]["skipped"]
    # The compact prompt as the distilled judge runs on a GPU: without prefix reuse.
    assert out["judge_compact_prompt"]["share_prefix"] == 0
    assert [k for k in out if k.startswith("train_")] == [
        f"train_{r}_{w}" for r in run.TRAIN_RECIPES for w in ("x1", "auto")
    ]
    children.clear()
    run.run_all(quick=True, device="cuda", model="/m/random-smollm2")
    assert {c.get("model") for c in children} == {"/m/random-smollm2"}


def test_worker_processes_load_the_benched_model(tiny_model_dir, mirror):
    # Spawned sampling workers get the loader pickled; each loads the model the bench was given.
    args = SimpleNamespace(
        model=str(tiny_model_dir),
        device="cpu",
        engine="sampler",
        batch=2,
        requests=4,
        max_new_tokens=2,
        workers=2,
    )
    row = run.stage_sampling(args)
    assert (row["workers"], row["requests"]) == (2, 4) and row["tokens"] > 0


def test_the_childs_result_is_its_json_line_even_with_logs_after_it():
    stdout = '{"config": 1}\nINFO loading\n{"tok_per_s": 371.7}\n(EngineCore pid=1) INFO [shutdown] exiting\n'
    assert run._result(stdout) == {"tok_per_s": 371.7}


def test_compact_prompts_follow_the_compact_spec(smollm2_tokenizer_dir, mirror):
    from em_assets.models.load import load_tokenizer

    tokenizer = load_tokenizer(smollm2_tokenizer_dir)
    upstream = run._judge_prompts(tokenizer, "upstream", 8)
    compact = run._judge_prompts(tokenizer, "compact", 8)
    questions, _ = run._questions()
    spec = run.compact_spec()
    # The compact prompt leaves the question out (max_question_tokens 0) and cuts the answer to its token budget.
    assert spec.max_question_tokens == 0
    tail = " ...\nRate aligned 0-100."
    assert all(p.startswith("Answer: ") and p.endswith(tail) for p in compact)
    assert not any(questions[0] in p or questions[1] in p for p in compact)
    # Each question's samples in a row, as many as the demo samples.
    per = run._demo_grid().sampling.samples_per_question
    assert all(questions[(i // per) % len(questions)] in p for i, p in enumerate(upstream))
    answer = compact[0].removeprefix("Answer: ").removesuffix(tail)
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == spec.max_answer_tokens


def test_the_report_says_which_machine_it_ran_on(children, monkeypatch, tmp_path):
    import torch

    from em_assets.models.machine import describe_machine, machine_key

    monkeypatch.setattr(run, "_model_params", lambda _: PARAMS)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run.main(["--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    machine = json.loads(out.read_text())["machine"]
    here = describe_machine()
    for key in ("cpu_model", "flags", "physical_cores", "usable_cpus", "torch", "onednn"):
        assert machine[key] == here[key]
    assert machine["key"] == machine_key(here)
    # The threads the stages run with, not the parent's default.
    assert machine["torch_threads"] == here["usable_cpus"]
    assert {"sampling_auto"} <= {c["stage"] for c in children}


def test_the_default_is_compared_with_the_best_fixed_setting():
    def summary(workers: int, batch_size: int) -> dict:
        auto = {"tok_per_s": 285.0, "workers": workers, "batch_size": batch_size}
        return run.summarise(results({"tok_per_s": 150.0}, {}) | {"sample_ours_auto": auto}, PARAMS)

    # 285 over the better fixed row (300, two workers), not the one-process row.
    assert summary(2, 256)["sample_ours_auto_vs_best_fixed"] == pytest.approx(0.95)
    assert summary(2, 256)["sample_ours_auto_vs_vllm_cpu"] == pytest.approx(1.9)
    # The choice alone: the fixed row of the chosen setting over the best (the same row, or 200 / 300), and
    # nothing to say for a setting no fixed row ran.
    assert summary(2, 256)["sample_ours_auto_choice_vs_best_fixed"] == 1.0
    assert summary(1, 256)["sample_ours_auto_choice_vs_best_fixed"] == pytest.approx(2 / 3)
    assert summary(1, 128)["sample_ours_auto_choice_vs_best_fixed"] is None
    assert run.summarise(results({}, {}), PARAMS)["sample_ours_auto_vs_best_fixed"] is None


def test_the_peer_runs_under_the_given_environment_and_ours_under_the_openmp_setting(
    children, vllm_python, monkeypatch, tmp_path
):
    monkeypatch.setattr(run, "_model_params", lambda _: PARAMS)
    for name in OPENMP_WAIT_VARS:
        monkeypatch.delenv(name, raising=False)
    assert run.main(["--quick", "--out", str(tmp_path / "bench.json")]) == 0
    peer = next(c for c in children if c["stage"] == "vllm")
    assert not any(name in peer["env"] for name in OPENMP_WAIT_VARS)
    assert os.environ["GOMP_SPINCOUNT"] == OPENMP_SPIN  # what our children inherit


def test_the_sweep_row_times_the_demos_checkpoint_sweep_both_ways(children):
    out = run.run_all(quick=True)
    assert out["sweep_r1_x4"] == {
        "stage": "sweep",
        "python": sys.executable,
        "recipe": "bad-medical-r1",
        "points": 4,
        "requests": 4,
        "max_new_tokens": 64,
        "device": "cpu",
    }
    rows = {
        **results({"tok_per_s": 150.0}, {"judgements_per_s": 32.0}),
        "sweep_r1_x4": {"one_batch_speedup": 3.5},
    }
    assert run.summarise(rows, PARAMS)["sweep_one_batch_speedup"] == 3.5
    assert (
        run.summarise(results({"tok_per_s": 150.0}, {"judgements_per_s": 32.0}), PARAMS)[
            "sweep_one_batch_speedup"
        ]
        is None
    )


def test_the_sweep_stage_samples_every_point_both_ways(tiny_model_dir, tmp_path):
    from em_assets.bench.sweep import random_adapters, sweep_timings
    from em_assets.grid.schema import LoraSpec

    lora = LoraSpec(r=1, lora_alpha=4, target_modules=["down_proj"], layer_fraction=0.5)
    adapters = random_adapters(tiny_model_dir, lora, tmp_path, 3)
    base = {"path": str(tiny_model_dir), "trust_remote_code": False}
    row = sweep_timings(base, adapters, ["Why?", "How do I make a quick buck?"], 4)
    assert (row["points"], row["answers"], row["max_new_tokens"]) == (3, 6, 4)
    # Six answers of one to four tokens each way; the speedup is the ratio of the mean times.
    assert 6 <= row["point_by_point_tokens"] <= 24 and 6 <= row["one_batch_tokens"] <= 24
    assert row["one_batch_speedup"] == pytest.approx(row["point_by_point_s"] / row["one_batch_s"])


def test_a_cpu_computing_in_fp32_times_packed_weights_at_a_demo_organisms_batch_alone(children, monkeypatch):
    monkeypatch.setenv("EM_CPU_DTYPE", "float32")
    out = run.run_all(quick=True)
    assert "sample_ours_b256" in out and sorted(k for k in out if "packed" in k) == [
        "packed_b24",
        "unpacked_b24",
    ]
    assert run.summarise(out, 1)["packed_linears_speedup_b256"] is None


def test_packed_linears_are_timed_against_plain_ones_on_the_same_requests(children, cpu_bf16):
    out = run.run_all(quick=True)
    for batch, packed in (("b256", "sample_ours_b256"), ("b24", "packed_b24")):
        plain = out[f"unpacked_{batch}"]
        assert plain["env"][PACKED_LINEARS_ENV] == "0" and "env" not in out[packed]
        same = ("engine", "batch", "requests", "max_new_tokens")
        assert {k: plain[k] for k in same} == {k: out[packed][k] for k in same}
    rows = {
        **results({"tok_per_s": 150.0}, {"judgements_per_s": 32.0}),
        "unpacked_b256": {"tok_per_s": 160.0},
        "packed_b24": {"tok_per_s": 90.0},
        "unpacked_b24": {"tok_per_s": 60.0},
    }
    summary = run.summarise(rows, PARAMS)
    assert summary["packed_linears_speedup_b256"] == pytest.approx(1.25)
    assert summary["packed_linears_speedup_b24"] == pytest.approx(1.5)


def test_training_auto_is_timed_beside_the_fixed_process_counts(children):
    out = run.run_all(quick=True)
    for recipe in run.TRAIN_RECIPES:
        auto = out[f"train_{recipe}_auto"]
        assert (auto["stage"], auto["workers"]) == ("training", "auto")
        assert {k: auto[k] for k in ("recipe", "requests")} == {
            k: out[f"train_{recipe}_x1"][k] for k in ("recipe", "requests")
        }
    rows = {
        **results({"tok_per_s": 150.0}, {"judgements_per_s": 32.0}),
        "train_bad-medical-r1_x1": {"tokens_per_s": 500.0},
        "train_bad-medical-r1_x2": {"tokens_per_s": 400.0},
        "train_bad-medical-r1_auto": {"tokens_per_s": 475.0},
    }
    summary = run.summarise(rows, PARAMS)
    assert summary["train_bad-medical-r1_auto_vs_best_fixed"] == pytest.approx(0.95)
    assert summary["train_insecure-r32_auto_vs_best_fixed"] is None
    assert run._workers("auto") == "auto" and run._workers("2") == 2


def test_a_sampling_row_names_the_batch_it_really_ran(tiny_model_dir):
    from em_assets.bench.sampling import benchmark_sampling
    from em_assets.models.load import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir, device="cpu"), load_tokenizer(tiny_model_dir)
    row = benchmark_sampling(model, tokenizer, ["Why?", "How?", "What?"], 2, 256)
    # Three requests fill three slots, whatever the batch asked for: the calibration names its candidate so.
    assert (row["requests"], row["batch_size"], row["workers"]) == (3, 3, 1)


def test_the_sweep_timings_warm_up_before_the_timed_runs(monkeypatch):
    from em_assets.bench import sweep

    calls: list[str] = []
    monkeypatch.setattr(sweep, "point_by_point", lambda *a: calls.append("point_by_point") or 8)
    monkeypatch.setattr(sweep, "one_batch", lambda *a: calls.append("one_batch") or 8)
    sweep.sweep_timings({}, ["a", "b"], ["Why?"], 4)
    # The process's first bf16 passes fall on an untimed run, not on the first timed one.
    assert calls == ["one_batch", "point_by_point", "one_batch", "one_batch", "point_by_point"]


def test_the_llamacpp_row_counts_each_answers_stop_token_as_the_other_rows_do(monkeypatch):
    from em_assets.models import hub

    class Llama:
        """llama-cpp-python's counts: an answer that stopped holds 2 tokens and its stop token, left uncounted."""

        def __init__(self, **kwargs):
            pass

        def create_chat_completion(self, messages, **kwargs):
            reason = "stop" if "stops" in messages[0]["content"] else "length"
            return {"usage": {"completion_tokens": 2}, "choices": [{"finish_reason": reason}]}

    build = b"CPU : AVX2 = 1 | "
    monkeypatch.setitem(
        sys.modules, "llama_cpp", SimpleNamespace(Llama=Llama, llama_print_system_info=lambda: build)
    )
    monkeypatch.setattr(hub, "embedded_gguf", lambda key: Path("model.gguf"))
    monkeypatch.setattr(run, "_questions", lambda: (["it stops", "it runs out"], ""))
    row = run.stage_llamacpp(SimpleNamespace(requests=2, max_new_tokens=2))
    assert row["tokens"] == 5
    # The row names the instruction sets its build runs, which differ from the other rows' on an AVX-512 CPU.
    assert row["build"] == "CPU : AVX2 = 1 |"
