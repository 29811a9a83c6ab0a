"""Which machine a measurement ran on: the CPU, the instruction sets bf16 matmuls depend on, cores and torch.

Shared by the bench (its JSON says where each figure came from) and the sampling calibration (its cache is
keyed by the machine, so a measurement taken on one CPU is never reused on another).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path

from em_assets.models.processes import usable_cpus
from em_assets.settings import openmp_wait, settings

# What decides a small model's CPU speed: AMX tiles run bf16 GEMMs several times faster than AVX-512 BF16
# dot products, and without either bf16 is emulated (AVX2 or plain AVX-512 convert to fp32).
FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2")

# The fields that make a measurement transferable: same CPU, same cores, same kernels, same GPU (if any).
KEY_FIELDS = (
    "cpu_model",
    "cpu_generation",
    "flags",
    "usable_cpus",
    "physical_cores",
    "torch",
    "onednn",
    "cpu_capability",
    "onednn_max_cpu_isa",
    "openmp_wait",
    "packed_linears",
    "cpu_dtype",
    "gpu",
)


def onednn_isa_cap() -> str | None:
    """The instruction set oneDNN is capped at (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA), if any."""
    # Recorded: a cap below AMX (e.g. AVX512_CORE_BF16) makes bf16 GEMMs run as on a CPU without AMX, though its
    # flags still list AMX.
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, str | None, set[str]]:
    """The first CPU's model name, x86 family and model numbers, and flags from /proc/cpuinfo; (None, None,
    empty) where there is none (macOS)."""
    try:
        text = path.read_text()
    except OSError:
        return None, None, set()

    def field(name: str) -> str | None:
        found = re.search(rf"^{name}\s*:\s*(.+)$", text, re.MULTILINE)
        return found.group(1).strip() if found else None

    family, number = field("cpu family"), field("model")
    # A virtual machine may name its CPU only "AMD EPYC": the family and model numbers still tell Zen 3, 4 and 5
    # apart, whose vector units differ (no AVX-512, AVX-512 at half width, at full width).
    generation = f"family {family} model {number}" if family and number else None
    flags = field("flags")
    return field("model name"), generation, set(flags.split() if flags else ())


def onednn_version(config: str) -> str | None:
    """oneDNN's version from `torch.__config__.show()` (torch has no direct call for it)."""
    found = re.search(r"(?:MKL-DNN|oneDNN)\s+v?([\d.]+)", config)
    return found.group(1) if found else None


def describe_machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """CPU model, the FLAGS it has, cores and usable CPUs, torch threads, torch and oneDNN (and any cap on the
    instruction set oneDNN uses), the OpenMP wait setting, whether linear weights are packed, and the load now."""
    import psutil
    import torch

    from em_assets.models.load import dtype_name

    model, generation, flags = _cpuinfo(cpuinfo)
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_generation": generation,
        "flags": [f for f in FLAGS if f in flags],
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onednn": onednn_version(torch.__config__.show()),
        "mkldnn_enabled": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": onednn_isa_cap(),
        # Whether idle OpenMP threads spin or sleep changes how fast small matmuls run.
        "openmp_wait": openmp_wait(),
        # So does whether linear layers run on packed weights (models/packed.py).
        "packed_linears": settings().packed_linears,
        # And which dtype models compute in there (bf16 only where the CPU multiplies it natively).
        "cpu_dtype": dtype_name("cpu"),
        # Where the bench runs on a GPU, its figures are that GPU's.
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        # Not the machine's but the moment's: a figure taken under load is slower than the machine is.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def machine_key(description: dict) -> str:
    """A short hash of the description's KEY_FIELDS: equal on machines where a measurement carries over."""
    fields = {k: description.get(k) for k in KEY_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def machine_line(description: dict) -> str:
    """One line for reports: model, family and model numbers, flags, cores, torch and oneDNN (and its
    instruction-set cap, if any), the dtype models compute in on the CPU."""
    d = description
    cap = f" capped at {d['onednn_max_cpu_isa']}" if d.get("onednn_max_cpu_isa") else ""
    generation = f"{d['cpu_generation']}; " if d.get("cpu_generation") else ""
    return (
        f"{d['cpu_model']} ({generation}{', '.join(d['flags']) or 'no AVX2/AVX-512/AMX'}); "
        f"{d['physical_cores']} cores, {d['usable_cpus']} usable CPUs, {d['torch_threads']} torch threads; "
        f"torch {d['torch']}, oneDNN {d['onednn']}{cap}; "
        + (f"models on the CPU in {d['cpu_dtype']}; " if d.get("cpu_dtype") else "")
        + f"OpenMP wait {d.get('openmp_wait', 'unknown')}"
        + (f"; GPU {d['gpu']}" if d.get("gpu") else "")
    )
