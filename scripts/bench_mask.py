"""Dropout masks on the CPU: minift's `keep_mask` against the ways torch draws them.

  keep_mask      the geometric walk: only the drops' positions are drawn (minift.ops)
  ... through the op   the same walk through the custom op minift::drawn_keep, as compiled
                 code draws it (the same mask; the op's dispatch costs)
  32-bit >= t    one 32-bit integer an element >= a threshold, 256K at a time: keep_mask
                 until 2026-12-02
  uniform >= p   torch.rand(shape) >= p, one float draw of the whole mask
  bernoulli_     what F.dropout draws on the CPU: an empty float tensor, bernoulli_(1 - p)

One LoRA step of GPT-2 small at 4 x 256 with every dropout on (p = 0.1) draws 57.4M mask
elements: 12 layers of causal attention in 128-query blocks (28.3M), two residual
dropouts (18.9M), LoRA's input dropout on c_attn (9.4M) and the embeddings' (0.8M). Each
round times every way on that many elements, in the shapes they come in, in turn; the
ratios are per round, and the table gives their median and range.

    python scripts/bench_mask.py --rounds 7
    python scripts/bench_mask.py --rounds 7 --p 0.5                # the walk's worst case
    python scripts/bench_mask.py --rounds 9 --draws 13,15,17       # keep_mask's MASK_DRAWS, as 2^k
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minift.ops as ops  # noqa: E402
from minift.ops import keep_mask  # noqa: E402

P = 0.1      # --p
# (shape, how many per step): GPT-2 small, B=4, T=256, 12 layers, query blocks of 128
SHAPES = [((4 * 12 * (128 * 128 + 128 * 256),), 12),   # attention probabilities, causal blocks
          ((4, 256, 768), 2 * 12 + 1),                  # residual dropouts, embeddings
          ((4, 256, 768), 12)]                          # LoRA's dropout on c_attn's input
WAYS = {
    "keep_mask": lambda shape: keep_mask(shape, P, torch.device("cpu")),
    "... through the op": lambda shape: ops.drawn_keep(ops._DRAW_ORDER, math.prod(shape), P),
    "32-bit >= t": lambda shape: threshold_mask(shape),
    "uniform >= p": lambda shape: torch.rand(shape) >= P,
    "bernoulli_": lambda shape: torch.empty(shape).bernoulli_(1 - P),
}


def threshold_mask(shape):
    """keep_mask until 2026-12-02: a uniform signed 32-bit integer an element, kept when
    >= round(p 2^32) - 2^31, drawn as int64 halves 256K elements at a time."""
    threshold = round(P * 2**32) - 2**31
    keep = torch.empty(shape, dtype=torch.bool)
    bits = torch.empty(1 << 17, dtype=torch.int64)
    for part in keep.view(-1).split(1 << 18):
        m = part.numel()
        bits[:(m + 1) // 2].random_(-2**63, None)
        torch.ge(bits.view(torch.int32)[:m], threshold, out=part)
    return keep.view(torch.uint8)


def one_step(way) -> float:
    t0 = time.perf_counter()
    for shape, count in SHAPES:
        for _ in range(count):
            way(shape)
    return time.perf_counter() - t0


def sweep_draws(ks: list[int], rounds: int) -> None:
    """keep_mask per step with each MASK_DRAWS in turn, interleaved: median and all rounds."""
    times = {k: [] for k in ks}
    for r in range(rounds + 1):       # round 0 warms up
        for k in ks:
            ops.MASK_DRAWS = 1 << k
            t = one_step(WAYS["keep_mask"])
            if r:
                times[k].append(t)
    for k, ts in times.items():
        print(f"MASK_DRAWS 2^{k}: {statistics.median(ts) * 1e3:6.1f} ms/step (rounds "
              f"{min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f})")


def main():
    global P
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--p", type=float, default=P, help="the dropout probability")
    ap.add_argument("--draws",
                    help="comma-separated k: time keep_mask alone with MASK_DRAWS = 2^k")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    P = args.p
    if args.draws:
        return sweep_draws([int(k) for k in args.draws.split(",")], args.rounds)
    n = sum(torch.Size(s).numel() * c for s, c in SHAPES)
    masks = []
    for name in ("keep_mask", "... through the op"):   # the same draw, the same mask
        torch.manual_seed(0)
        masks.append(WAYS[name](SHAPES[0][0]).view(torch.uint8))
    assert torch.equal(*masks), "keep_mask and its op drew different masks"
    for way in WAYS.values():   # warm-up: allocator, first-call costs
        one_step(way)
    times = {name: [] for name in WAYS}
    for _ in range(args.rounds):
        for name, way in WAYS.items():
            times[name].append(one_step(way))
    print(f"torch {torch.__version__}, {args.threads} threads, {n / 1e6:.1f}M mask elements "
          f"per step, p = {P}, {args.rounds} rounds\n")
    print(f"{'way':18s} {'ms/step':>8s} {'ns/elem':>8s} {'keep_mask / it':>16s}")
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(times["keep_mask"], ts)]
        med = statistics.median(ts)
        spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"{name:18s} {med * 1e3:8.1f} {med / n * 1e9:8.2f} {spread:>16s}")


if __name__ == "__main__":
    main()
