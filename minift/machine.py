"""This machine: the device minift uses when none is named, and, as the planner sees it, how
fast it multiplies matrices, how much memory is free, and amounts of memory as people write
them ("24GiB"). plan.py turns a model's counts into seconds and a fit with these. And
whether a device name is one torch reads and this machine has (device_problem,
available_devices), for --device and TrainConfig.device.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from .linear import matmul


def default_device() -> str:
    """"cuda" when torch sees a CUDA device, else "cpu": the default device everywhere in
    minift (training, the commands, the planner, the scripts)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_devices() -> list[str]:
    """The devices torch can run on here: "cpu", then each CUDA device, then "mps"."""
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())
                       if torch.cuda.is_available()]
    return names + (["mps"] if torch.backends.mps.is_available() else [])


def device_problem(name: str, present: bool = True) -> str | None:
    """What is wrong with a device name, as a phrase to follow the option's name ("TrainConfig.
    device", "--device"), or None. present=False accepts a CUDA or MPS device this machine
    lacks (`minift plan` plans for a GPU elsewhere); the name must still be one torch reads."""
    here = f"(available here: {', '.join(available_devices())})"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch's "Expected one of cpu, cuda, ..., got bogus"
        return f"must be a device such as cpu, cuda or cuda:1 {here}"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"must be cpu, cuda, cuda:N or mps, not {device.type!r} {here}"
    if not present or device.type == "cpu":
        return None
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"names Apple's MPS, which torch does not see on this machine {here}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"names CUDA, but torch sees no CUDA device on this machine {here}"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"names CUDA device {device.index}, which this machine does not have {here}"
    return None


def matmul_rate(dtype: str = "fp32", device: str = "cpu", n: int = 1024, repeat: int = 5) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul here, the best of `repeat` (after one warm-up),
    through minift.linear.matmul: the kernel minift's layers use (oneDNN's in fp32 on the CPU)."""
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    best = math.inf
    for _ in range(repeat + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def free_memory(device: str = "cpu") -> int | None:
    """Bytes free for a new process: CUDA's free memory, or the OS's MemAvailable."""
    if device.startswith("cuda"):   # None when planning for a GPU on a machine without one
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def parse_bytes(text: str) -> int:
    """"24GiB", "16GB", "512MiB", "1e9" -> bytes."""
    units = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
             "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    try:
        return int(float(number) * units[s[len(number):]])
    except (ValueError, KeyError):
        raise ValueError(f"cannot read {text!r} as an amount of memory "
                         "(e.g. 24GiB, 16GB, 512MiB)") from None
