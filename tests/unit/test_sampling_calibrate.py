"""`workers: auto` / `batch_size: auto` by calibration: what is timed, what is cached and reused, what is forced.

Timed on the tiny random Llama; no test depends on which candidate is faster, only on which rates were recorded.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from support.children import holding

from em_assets.grid.schema import SamplingSpec
from em_assets.models import machine
from em_assets.models.load import load_organism_model
from em_assets.sampling import calibrate
from em_assets.sampling.calibrate import candidate_key, candidates, choose_sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def loader_for(path: Path) -> functools.partial:
    return functools.partial(load_organism_model, {"path": str(path), "trust_remote_code": False}, {}, "cpu")


def base_for(path: Path) -> dict:
    return {"path": str(path), "revision": "tiny-r0", "num_params": 100_000, "trust_remote_code": False}


class TimedBatches(list):
    depths: list[int]

    def __init__(self):
        super().__init__()
        self.depths = []


@pytest.fixture
def timed(monkeypatch) -> list[int]:
    """The batch of every decode_rate call: a spy that still times the real model (depths in `timed.depths`)."""
    calls = TimedBatches()
    real = calibrate.decode_rate

    def spy(model, tokenizer, batch, depth):
        calls.append(batch)
        calls.depths.append(depth)
        return real(model, tokenizer, batch, depth)

    monkeypatch.setattr(calibrate, "decode_rate", spy)
    return calls


def choose(tiny_model_dir, cache: Path, requests: int = 200, **spec) -> calibrate.SamplingChoice:
    return choose_sampling(
        SamplingSpec(**spec),
        requests,
        device="cpu",
        base=base_for(tiny_model_dir),
        loader=loader_for(tiny_model_dir),
        cache_dir=cache,
    )


def test_candidates_are_the_batches_that_would_run_and_forced_settings_alone():
    every = [(1, 64), (1, 128), (1, 256), (1, 512), (2, 64), (2, 128), (2, 256), (2, 500)]
    assert candidates(1000, "auto", "auto", 2, None) == candidates(1000, "auto", "auto", 2, 1024) == every
    # A worker's share caps its batch: 100 requests fill 64 or 100 slots in one process, 50 in each of two.
    assert candidates(100, "auto", "auto", 2, None) == [(1, 64), (1, 100), (2, 50)]
    assert candidates(24, "auto", "auto", 1, None) == [(1, 24)]
    assert candidates(1000, 2, "auto", 4, None) == [(2, 64), (2, 128), (2, 256), (2, 500)]
    assert candidates(1000, "auto", 32, 8, None) == [(1, 32), (2, 32), (4, 32), (8, 32)]
    assert calibrate.worker_counts(6) == [1, 2, 4, 6]


def test_candidates_hold_no_more_slots_than_memory_does():
    # 300 slots in memory: one process up to 256, two workers up to 128 each; a forced batch is not second-guessed.
    assert candidates(1000, "auto", "auto", 2, 300) == [(1, 64), (1, 128), (1, 256), (2, 64), (2, 128)]
    assert candidates(1000, "auto", "auto", 2, 10) == [(1, 64), (2, 64)]
    assert candidates(1000, 1, 512, 2, 10) == [(1, 512)]


def test_the_memory_bound_is_the_kv_cache_half_the_free_memory_holds(tiny_model_dir, monkeypatch):
    from em_assets.models.load import load_model
    from em_assets.sampling.slots import kv_bytes_per_slot

    per_slot = kv_bytes_per_slot(load_model(tiny_model_dir, device="cpu"), 700)
    monkeypatch.setattr(calibrate, "available_memory", lambda: 2 * 300 * per_slot + 1)
    assert calibrate.slots_in_memory(base_for(tiny_model_dir), 700) == 300
    monkeypatch.setattr(calibrate, "available_memory", lambda: None)
    assert calibrate.slots_in_memory(base_for(tiny_model_dir), 700) is None


def test_the_choice_is_the_fastest_recorded_rate():
    options = [(1, 64), (1, 128), (2, 64)]
    rates = {candidate_key((1, 64)): 5.0, candidate_key((1, 128)): 9.0, candidate_key((2, 64)): 7.0}
    assert calibrate.best(options, rates, 1000) == (1, 128)
    rates[candidate_key((2, 64))] = 9.0  # a tie goes to fewer workers
    assert calibrate.best(options, rates, 1000) == (1, 128)


def test_within_the_timing_spread_the_fewest_waves_win():
    options = [(1, 256), (1, 512), (2, 256)]
    rates = {candidate_key((1, 256)): 100.0, candidate_key((1, 512)): 96.0, candidate_key((2, 256)): 60.0}
    # 512 requests: one wave at 512 slots (or two workers of 256), two waves at 256.
    assert [calibrate.waves(512, c) for c in options] == [2, 1, 1]
    assert calibrate.best(options, rates, 512) == (1, 512)
    # The same waves either way: the faster wins.
    assert calibrate.best(options, rates, 200) == (1, 256)
    # Up to 10% off is within the spread; further off, the faster wins whatever the waves.
    rates[candidate_key((1, 512))] = 91.0
    assert calibrate.best(options, rates, 512) == (1, 512)
    rates[candidate_key((1, 512))] = 89.0
    assert calibrate.best(options, rates, 512) == (1, 256)


def test_candidates_are_timed_in_mirrored_rounds_and_keep_their_better_round(tiny_model_dir, monkeypatch):
    # A slow spell over the first two timings and another over the fourth: each candidate keeps the round that
    # missed them.
    script = iter([50.0, 60.0, 200.0, 100.0, 70.0, 90.0])
    order = []

    def decode_rate(model, tokenizer, batch, depth):
        order.append(batch)
        return next(script)

    monkeypatch.setattr(calibrate, "decode_rate", decode_rate)
    rates, startup = calibrate.measure(loader_for(tiny_model_dir), [(1, 64), (1, 128), (1, 256)], 4)
    assert order == [64, 128, 256, 256, 128, 64]
    assert rates == {(1, 64): 90.0, (1, 128): 70.0, (1, 256): 200.0} and startup == {}


def test_calibration_is_recorded_then_reused_without_timing_again(tiny_model_dir, tmp_path, timed):
    first = choose(tiny_model_dir, tmp_path, workers=1)
    assert first.why == "calibrated" and first.forced == ("workers",)
    assert timed == [64, 128, 200, 200, 128, 64]
    assert set(first.rates) == {candidate_key((1, b)) for b in (64, 128, 200)}
    assert all(r > 0 for r in first.rates.values())
    assert (first.workers, first.batch_size) == calibrate.best(
        [(1, 64), (1, 128), (1, 200)], first.rates, 200
    )
    [path] = (tmp_path / "calibration").glob("sampling-*.json")
    assert first.machine in path.name and "tiny-r0" in path.name
    written = path.read_text()
    assert json.loads(written)["machine"]["cpu_model"]

    second = choose(tiny_model_dir, tmp_path, workers=1)
    assert second.why == "cached" and timed == [64, 128, 200, 200, 128, 64]
    assert (second.workers, second.batch_size, second.rates) == (first.workers, first.batch_size, first.rates)
    assert path.read_text() == written


def test_the_cached_rates_decide_and_only_missing_candidates_are_timed(tiny_model_dir, tmp_path, timed):
    base = base_for(tiny_model_dir)
    depth = calibrate.timing_depth(SamplingSpec().max_new_tokens)
    path = calibrate.cache_path(tmp_path, machine.machine_key(machine.describe_machine()), base, depth)
    path.parent.mkdir(parents=True)
    rates = {candidate_key((1, b)): r for b, r in ((64, 10.0), (128, 30.0), (256, 20.0), (512, 25.0))}
    path.write_text(json.dumps({"rates": rates}))
    assert (choose(tiny_model_dir, tmp_path, 1000, workers=1).batch_size, timed) == (128, [])
    # A job that fits 200 slots adds that one candidate to the cache; the others keep their recorded rates.
    choice = choose(tiny_model_dir, tmp_path, 200, workers=1)
    assert choice.why == "calibrated" and timed == [200, 200]
    assert json.loads(path.read_text())["rates"] == rates | {
        candidate_key((1, 200)): choice.rates["workers=1 batch=200"]
    }


def test_another_machine_does_not_reuse_the_calibration(tiny_model_dir, tmp_path, timed, monkeypatch):
    choose(tiny_model_dir, tmp_path, workers=1, batch_size=16)
    # workers and batch both forced: nothing is timed.
    assert timed == []
    choose(tiny_model_dir, tmp_path, 200, workers=1)
    here = len(timed)
    described = machine.describe_machine()
    monkeypatch.setattr(calibrate, "describe_machine", lambda: described | {"cpu_model": "AMD EPYC 9R14"})
    other = choose(tiny_model_dir, tmp_path, 200, workers=1)
    assert other.why == "calibrated" and len(timed) == 2 * here
    assert len(list((tmp_path / "calibration").glob("sampling-*.json"))) == 2


def test_forced_settings_override_the_calibration(tiny_model_dir, tmp_path, timed):
    calibrated = choose(tiny_model_dir, tmp_path, workers=1)
    forced = choose(tiny_model_dir, tmp_path, workers=2, batch_size=7)
    assert (forced.workers, forced.batch_size, forced.why, forced.rates) == (2, 7, "forced", {})
    assert forced.forced == ("workers", "batch_size")
    assert calibrated.why == "calibrated" and len(timed) == 6
    # Off the CPU there is nothing to time: one process, the batch left to the engine.
    gpu = choose_sampling(
        SamplingSpec(), 1000, device="cuda", base=base_for(tiny_model_dir), loader=None, cache_dir=tmp_path
    )
    assert (gpu.workers, gpu.batch_size, gpu.why) == (1, "auto", "not a CPU")


def test_worker_counts_are_timed_in_worker_processes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("em_assets.models.processes.usable_cpus", lambda: 2)
    choice = choose(tiny_model_dir, tmp_path, 64, batch_size=32)
    assert set(choice.rates) == {candidate_key((1, 32)), candidate_key((2, 32))}
    assert all(r > 0 for r in choice.rates.values())
    assert choice.why == "calibrated" and choice.forced == ("batch_size",)
    # Spawning them and loading a model in each took time this process, its model loaded, did not spend.
    assert set(choice.startup) == {"2"} and choice.startup["2"] > 0
    cached = json.loads(next((tmp_path / "calibration").glob("sampling-*.json")).read_text())
    assert cached["startup"] == choice.startup
    again = choose(tiny_model_dir, tmp_path, 64, batch_size=32)
    assert (again.why, again.startup) == ("cached", choice.startup)


def test_workers_that_decode_faster_lose_a_job_too_short_to_pay_for_their_start():
    options = [(1, 128), (2, 64)]
    rates = {candidate_key((1, 128)): 330.0, candidate_key((2, 64)): 385.0}
    startup = {"2": 6.0}
    # 8,192 tokens: 24.8 s in one process, 21.3 + 6 s in two.
    assert calibrate.best(options, rates, 128, 128 * 64, startup) == (1, 128)
    # 65,536 tokens: 199 s against 170 + 6 s.
    assert calibrate.best(options, rates, 512, 512 * 128, startup) == (2, 64)
    # Rates alone (no job size or no start-up timed): the faster.
    assert calibrate.best(options, rates, 128) == calibrate.best(options, rates, 128, 8192, {}) == (2, 64)


def test_machine_description_names_the_cpu_and_what_matters_for_bf16(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9R14\n"
        "flags\t\t: fpu avx2 avx512f avx512_bf16 sse\n\n"
        "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9R14\n"
        "flags\t\t: fpu avx2 avx512f avx512_bf16 sse\n"
    )
    amd = machine.describe_machine(cpuinfo)
    assert amd["cpu_model"] == "AMD EPYC 9R14" and amd["cpu_generation"] == "family 25 model 17"
    assert amd["flags"] == ["avx512_bf16", "avx512f", "avx2"]
    assert amd["torch"] and amd["usable_cpus"] >= 1
    intel = amd | {
        "cpu_model": "Intel(R) Xeon(R) Processor",
        "flags": ["amx_bf16", "amx_tile", *amd["flags"]],
    }
    assert machine.machine_key(amd) != machine.machine_key(intel)
    # A virtual machine naming its CPU "AMD EPYC" whatever its generation: Zen 5 is another machine than Zen 4.
    zen5 = amd | {"cpu_generation": "family 26 model 2"}
    assert machine.machine_key(amd) != machine.machine_key(zen5)
    # Threads are set per process, and the load is the moment's: neither says anything about the machine.
    assert machine.machine_key(amd) == machine.machine_key(
        amd | {"torch_threads": 99, "load_average_1m": 9.5}
    )
    assert "AMD EPYC 9R14 (family 25 model 17; avx512_bf16, avx512f, avx2)" in machine.machine_line(amd)


def test_the_dtype_models_compute_in_on_the_cpu_is_another_machine(monkeypatch):
    monkeypatch.setenv("EM_CPU_DTYPE", "float32")
    fp32 = machine.describe_machine()
    monkeypatch.setenv("EM_CPU_DTYPE", "bfloat16")
    bf16 = machine.describe_machine()
    assert (fp32["cpu_dtype"], bf16["cpu_dtype"]) == ("float32", "bfloat16")
    assert machine.machine_key(fp32) != machine.machine_key(bf16)
    assert "; models on the CPU in float32; OpenMP wait" in machine.machine_line(fp32)


def test_a_cap_on_onednn_instruction_set_is_another_machine(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    amx = machine.describe_machine()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    capped = machine.describe_machine()
    assert (amx["onednn_max_cpu_isa"], capped["onednn_max_cpu_isa"]) == (None, "AVX512_CORE_BF16")
    assert machine.machine_key(amx) != machine.machine_key(capped)
    assert "capped at AVX512_CORE_BF16;" in machine.machine_line(capped)


def test_another_openmp_wait_setting_is_another_machine(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    spinning = machine.describe_machine()
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    sleeping = machine.describe_machine()
    assert (spinning["openmp_wait"], sleeping["openmp_wait"]) == (
        "GOMP_SPINCOUNT=10000",
        "OMP_WAIT_POLICY=PASSIVE",
    )
    assert machine.machine_key(spinning) != machine.machine_key(sleeping)
    assert machine.machine_line(sleeping).endswith("OpenMP wait OMP_WAIT_POLICY=PASSIVE")


def test_packed_and_plain_linear_weights_are_two_machines(monkeypatch):
    monkeypatch.delenv("EM_PACKED_LINEARS", raising=False)
    packed = machine.describe_machine()
    monkeypatch.setenv("EM_PACKED_LINEARS", "0")
    plain = machine.describe_machine()
    assert (packed["packed_linears"], plain["packed_linears"]) == (True, False)
    assert machine.machine_key(packed) != machine.machine_key(plain)


def test_a_host_with_a_gpu_is_another_machine():
    here = {**machine.describe_machine(), "gpu": None}
    with_gpu = {**here, "gpu": "NVIDIA H200"}
    assert machine.machine_key(with_gpu) != machine.machine_key(here)
    assert not machine.machine_line(here).endswith("H200")
    assert machine.machine_line(with_gpu).endswith("; GPU NVIDIA H200")


def test_onednn_version_is_read_from_torchs_build_config():
    import torch

    assert machine.onednn_version("  - Intel(R) MKL-DNN v3.7.1 (Git Hash 8d263e6)") == "3.7.1"
    assert machine.onednn_version(torch.__config__.show()) == machine.describe_machine()["onednn"]


def test_a_damaged_cache_file_is_timed_again(tiny_model_dir, tmp_path, timed):
    first = choose(tiny_model_dir, tmp_path, workers=1)
    [path] = (tmp_path / "calibration").glob("sampling-*.json")
    path.write_text('{"rates": {"workers=1 ba')
    again = choose(tiny_model_dir, tmp_path, workers=1)
    assert again.why == "calibrated" and len(timed) == 4 * len(first.rates)
    assert set(json.loads(path.read_text())["rates"]) == set(first.rates)


def test_steps_are_timed_over_a_cache_as_deep_as_the_answers(tiny_model_dir, tmp_path, timed):
    from em_assets.models.load import load_tokenizer

    assert [calibrate.timing_depth(n) for n in (1, 64, 128, 600)] == [1, 64, 128, 512]
    prompts = calibrate.timing_prompts(load_tokenizer(tiny_model_dir), 64)
    bare = calibrate.timing_prompts(load_tokenizer(tiny_model_dir), 0)
    assert [len(p) - len(b) for p, b in zip(prompts, bare, strict=True)] == [64] * len(bare)
    choose(tiny_model_dir, tmp_path, workers=1, max_new_tokens=128)
    assert set(timed.depths) == {128}
    # Another answer length is timed at its own depth and cached apart; the first is reused as it was.
    longer = choose(tiny_model_dir, tmp_path, workers=1, max_new_tokens=600)
    assert longer.why == "calibrated" and set(timed.depths) == {128, 512}
    assert choose(tiny_model_dir, tmp_path, workers=1, max_new_tokens=150).why == "cached"
    assert len(list((tmp_path / "calibration").glob("sampling-*-depth*.json"))) == 2


def test_what_a_decode_step_computes_is_timed_as_sampled_in_a_cache_of_its_own(
    tiny_model_dir, tmp_path, monkeypatch
):
    seen = []

    def decode_rate(model, tokenizer, batch, depth, **warpers):
        seen.append(warpers)
        return float(batch)

    monkeypatch.setattr(calibrate, "decode_rate", decode_rate)
    choose(tiny_model_dir, tmp_path, 200, workers=1)
    plain = sorted((tmp_path / "calibration").glob("*.json"))
    choose(tiny_model_dir, tmp_path, 200, workers=1, top_k=20, repetition_penalty=1.05)
    assert seen and seen[0] == {} and seen[-1] == {"top_k": 20, "repetition_penalty": 1.05}
    assert len(sorted((tmp_path / "calibration").glob("*.json"))) == len(plain) + 1
    # A nucleus sorts the vocabulary each step and greedy decoding draws nothing: each is timed as it runs.
    choose(tiny_model_dir, tmp_path, 200, workers=1, top_p=0.9)
    assert seen[-1] == {"top_p": 0.9}
    choose(tiny_model_dir, tmp_path, 200, workers=1, temperature=0.0)
    assert seen[-1] == {"temperature": 0.0}
    assert len(sorted((tmp_path / "calibration").glob("*.json"))) == len(plain) + 3


@pytest.mark.timeout(60)
def test_a_job_behind_a_stuck_calibration_says_who_holds_it_and_gives_up(tmp_path, caplog):
    """Regression: the calibration's file lock had no timeout, so a job behind a live but stuck calibration
    waited silently for ever."""
    path = tmp_path / "sampling-m-r-depth8.json"
    options = [(1, 64), (1, 128)]
    path.write_text(json.dumps({"rates": {candidate_key(c): 1.0 for c in options}}))
    code = (
        f"import time; from filelock import FileLock; lock = FileLock({str(path) + '.lock'!r}); lock.acquire(); "
        "print('held', flush=True); time.sleep({})"
    )
    stuck = holding(code.format(60))
    try:
        with pytest.raises(
            TimeoutError, match=rf"gave up after 1 s waiting for PID {stuck.pid} to release .+\.lock"
        ):
            calibrate.cached_rates(path, options, None, {}, {}, 8, wait_s=1)
    finally:
        stuck.kill()
        stuck.wait()
    # A calibration that ends is waited for, and its rates are used; each wait is said once.
    done = holding(code.format(3))
    rates, _, measured = calibrate.cached_rates(path, options, None, {}, {}, 8, wait_s=30)
    done.wait()
    assert (rates, measured) == ({candidate_key(c): 1.0 for c in options}, False)
    waits = [r.getMessage() for r in caplog.records if "calibrating sampling" in r.getMessage()]
    assert waits == [
        f"PID {p} is calibrating sampling into {path}; waiting up to {s} s for it"
        for p, s in ((stuck.pid, 1), (done.pid, 30))
    ]
