"""Attention's forward + backward in training, without dropout, on the CPU: minift's
`ops.attention` (query blocks under bf16, SDPA in float32) against
`F.scaled_dot_product_attention` with `is_causal=True` (what transformers' GPT-2 runs),
interleaved and repeated:

    python scripts/bench_attention.py [--rounds 5] [--threads 2]

Shapes: minift-tiny's default job (16 x 8 heads x 112 tokens x 32), GPT-2 small at
B=4, T=256 and at B=1, T=1024 (12 heads x 64). Prints each case's median time and the
ratio SDPA / minift (above 1: minift faster) with its spread over the rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from minift.ops import attention

SHAPES = {"tiny default job": (16, 8, 112, 32), "GPT-2 small T=256": (4, 12, 256, 64),
          "GPT-2 small T=1024": (1, 12, 1024, 64)}


def timed(f, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="calls per timing")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| case | dtype | SDPA ms | minift ms | SDPA / minift (rounds) |\n"
          "|---|---|---:|---:|---:|")
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
            dy = torch.randn(shape, generator=g).to(dtype)
            runs = {"sdpa": lambda: F.scaled_dot_product_attention(
                        q, k, v, is_causal=True).backward(dy),
                    "minift": lambda: attention(q, k, v).backward(dy)}
            for f in runs.values():   # warm-up: the first call allocates
                f()
            times = {n: [] for n in runs}
            for _ in range(args.rounds):
                for n, f in runs.items():
                    times[n].append(timed(f, args.reps))
            ratios = [a / b for a, b in zip(times["sdpa"], times["minift"])]
            print(f"| {name} | {str(dtype)[6:]} | {statistics.median(times['sdpa']):.1f} | "
                  f"{statistics.median(times['minift']):.1f} | {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
