"""This machine as training sees it: devices, precision, threads, versions, matmul peak.

    fledge env          # print it all (paste it into bug reports)

Training uses `pick_device`, `pick_precision` and `set_threads` from here, and reports
model FLOPs utilisation against `matmul_peak`, measured on this machine rather than taken
from a datasheet.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass

import torch

from fledge.errors import RecipeError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device is cuda but no CUDA device is visible. Use train.device: auto or cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RecipeError("train.device is mps but Apple MPS is not available. Use train.device: auto or cpu.")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


@dataclass
class Precision:
    name: str                    # fp32 | bf16 | fp16
    autocast_dtype: torch.dtype | None
    needs_scaler: bool

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def pick_precision(name: str, device: torch.device) -> Precision:
    """auto: bf16 autocast on CUDA that supports it, fp16 with loss scaling on older CUDA, fp32 elsewhere.
    fast: the same, but bf16 also on a CPU that computes bf16 natively (about 2x its fp32 matmul speed)."""
    if name == "fast":
        name = "bf16" if device.type == "cpu" and cpu_supports_bf16() else "auto"
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "fp16" and device.type == "cpu":
        raise RecipeError("train.precision fp16 is not supported on CPU; use bf16 (if the CPU has AVX-512 bf16) "
                          "or fp32.")
    return Precision(name, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name], name == "fp16")


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX-512 BF16 or AMX), where bf16
    autocast roughly doubles matmul speed; elsewhere it is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(threads: int, local_world_size: int = 1) -> int:
    """Threads for torch on CPU: the recipe's number, else the cores shared among local processes."""
    n = threads or max(1, available_cores() // max(1, local_world_size))
    torch.set_num_threads(n)
    return n


@functools.lru_cache(maxsize=None)
def matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 1024,
                seconds: float = 0.25) -> float:
    """Measured FLOP/s of a square matmul on this device and dtype (cached per process).

    The operands come from a private generator: measuring never draws from the global RNG,
    which holds the dropout stream a resumed run has just restored."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dev, dtype)
    b = torch.randn(size, size, generator=g).to(dev, dtype)
    for _ in range(3):
        a @ b
    _sync(dev)
    n, start = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        if n % 4 == 0:
            _sync(dev)
            if time.perf_counter() - start > seconds:
                break
    elapsed = time.perf_counter() - start
    return 2 * size**3 * n / elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def collect_env(measure: bool = True) -> dict:
    import importlib.metadata as md
    device = pick_device("auto")
    info = {
        "fledge": md.version("fledge") if _installed("fledge") else "source",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu cores available": available_cores(),
        "torch threads": torch.get_num_threads(),
        "device (auto)": str(device),
        "precision (auto)": pick_precision("auto", device).name,
        "cuda": torch.version.cuda if torch.cuda.is_available() else "not available",
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "cpu native bf16": cpu_supports_bf16(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["bf16 supported"] = torch.cuda.is_bf16_supported()
    for pkg in ("torch", "transformers", "tokenizers", "sentencepiece", "safetensors", "numpy", "peft",
                "bitsandbytes", "gguf"):
        info[pkg] = md.version(pkg) if _installed(pkg) else "not installed"
    if measure:
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            try:
                info[f"matmul peak {name} ({device.type})"] = f"{matmul_peak(dtype, str(device)) / 1e9:.0f} GFLOP/s"
            except RuntimeError as e:
                info[f"matmul peak {name} ({device.type})"] = f"unsupported ({e})"
    return info


def _installed(pkg: str) -> bool:
    import importlib.metadata as md
    try:
        md.version(pkg)
        return True
    except md.PackageNotFoundError:
        return False
