"""The machine a figure came from: CPU model, the instruction-set flags that decide which kernels run,
and the CPUs this process may use. Every recorded measurement (bench/*.json) carries it, so a figure
always names its CPU family."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

# The instruction-set flags that decide which int8 and float kernels run (what a figure's CPU family is).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def _cpuinfo(field: str) -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), None)


def machine() -> dict[str, Any]:
    """cpu (model name), cpu_family_model (/proc/cpuinfo's "cpu family/model"), cpu_isa (the ISA_FLAGS it has), cpu_capability (torch's kernel level, where torch
    is installed) and cpus (what this process may use: the cgroup quota or the affinity mask)."""
    from handler.core import available_cpus

    flags = set((_cpuinfo("flags") or "").split())
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        capability = None
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    return {"cpu": _cpuinfo("model name") or platform.processor(),
            "cpu_family_model": f"{family}/{model}" if family and model else None, "cpu_isa": [f for f in ISA_FLAGS if f in flags],
            "cpu_capability": capability, "cpus": available_cpus()}
