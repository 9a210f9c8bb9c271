"""The machine a benchmark runs on: device, memory bandwidth, versions, commit."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from .. import cpu
from ..dtypes import backend_name, compute_dtype

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
GB = 1e9  # decimal, as bandwidth figures are quoted


# Memory bandwidth in GB/s, from llama.cpp discussion #4167, Apple's announcements and NVIDIA's data sheets
# (H100 SXM 3.35 TB/s, H200 4.8 TB/s). Longer names first.
# Max chips are listed at their 16-core-CPU bandwidth; the binned 14-core variants have less (M3 Max 300, M4 Max 410).
BANDWIDTH_GBPS = [
    ("M2 Ultra", 800.0), ("M4 Max", 546.0), ("M3 Max", 400.0), ("M2 Max", 400.0), ("M1 Max", 400.0),
    ("M4 Pro", 273.0), ("M2 Pro", 200.0), ("M1 Pro", 200.0), ("M3 Pro", 150.0),
    ("M5", 153.0), ("M4", 120.0), ("M3", 100.0), ("M2", 100.0), ("M1", 68.0),
    ("H200", 4800.0), ("H100 80GB HBM3", 3350.0), ("H100 SXM", 3350.0),
]


def memory_bandwidth(device: str) -> float | None:
    """GB/s of a known device name (None: unknown, e.g. any CPU or an H100 PCIe/NVL, whose figures differ)."""
    for name, gbps in BANDWIDTH_GBPS:
        if re.search(rf"\b{re.escape(name)}\b", device):
            return gbps
    return None


def _command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def device_name(backend: str | None = None) -> str:
    """A human name for the device MLX runs on: the GPU for CUDA, the chip on macOS, the CPU model otherwise."""
    backend = backend or backend_name()
    info = mx.device_info()
    if backend == "cuda":
        names = _command_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines()
        return names[0].strip() if names else str(info.get("device_name", "NVIDIA GPU"))
    if platform.system() == "Darwin":
        return _command_output(["sysctl", "-n", "machdep.cpu.brand_string"]) or str(info.get("device_name", "Apple"))
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return str(info.get("device_name", platform.processor() or "CPU"))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> dict[str, Any]:
    if not (REPO_ROOT / ".git").exists():
        return {"commit": "unknown (not a git checkout)", "dirty": None}
    commit = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]) or "unknown"
    dirty = bool(_command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"]))
    return {"commit": commit, "dirty": dirty}


def machine_info() -> dict[str, Any]:
    backend = backend_name()
    device = device_name(backend)
    bandwidth = memory_bandwidth(device) if backend != "cpu" else None
    return {
        "backend": backend, "device": device, "device_info": {k: str(v) for k, v in mx.device_info().items()},
        "bandwidth_gbps": bandwidth,
        "bandwidth_note": "known device" if bandwidth else "unknown for this device: roofline fractions omitted",
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_streams": cpu.stream_count() if backend == "cpu" else None,  # afm-mlx's matmul split (afm_mlx.cpu)
        "compute_dtype": str(compute_dtype()).replace("mlx.core.", ""),
        "versions": {p: _version(p) for p in ("afm-mlx", "mlx", "mlx-lm", "numpy")},
        "git": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def machine_slug(machine: dict[str, Any]) -> str:
    """`<backend>-<device>` for the results directory, e.g. `cpu-amd-epyc`, `cuda-nvidia-h100-80gb-hbm3`."""
    device = re.sub(r"[^a-z0-9]+", "-", machine["device"].lower()).strip("-")
    return f"{machine['backend']}-{device or 'unknown'}"


