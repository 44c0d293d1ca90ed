"""The LM-head loss's softmax block: `loss.ChunkedHeadLoss` forward + backward at GPT-2 small's
head (1,020 target rows of a 4 x 256 batch, V = 50257, C = 768), with loss.SOFTMAX_ROWS set to
each value in turn, interleaved, in fp32 and under bf16 autocast. A value of 512 (HEAD_CHUNK)
is one pass over each chunk, as before SOFTMAX_ROWS existed; every value gives the same loss
and gradient, to the bit (checked here too). Prints each value's median time and its ratio
against 512, with the range over the rounds. Then, in fp32, the head with its two products
(the logits, the gradient of h) through oneDNN against both through MKL (minift.linear.GEMM),
interleaved: the same loss and gradient to float32's rounding (checked).

    python scripts/bench_head.py --rounds 9 [--rows 32,64,128,512]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minift.linear as linear  # noqa: E402
import minift.loss as lm_loss  # noqa: E402

N, C, V = 1020, 768, 50257
SHIPPED_ROWS = lm_loss.SOFTMAX_ROWS  # before the sweep sets it


def step(h0, w, y, dtype: str, rows: int, gemm: str = "onednn"):
    """One forward + backward with SOFTMAX_ROWS = rows and linear.GEMM = gemm:
    (loss, d loss / d h)."""
    lm_loss.SOFTMAX_ROWS, linear.GEMM = rows, gemm
    h = h0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = lm_loss.ChunkedHeadLoss.apply(h, w, y, lm_loss.HEAD_CHUNK)
    loss.backward()
    return loss.detach(), h.grad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--rows", default="32,64,128,512")
    args = ap.parse_args()
    values = [int(x) for x in args.rows.split(",")]
    if lm_loss.HEAD_CHUNK not in values:
        values.append(lm_loss.HEAD_CHUNK)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, C, generator=g) * 0.02
    h0, y = torch.randn(N, C, generator=g), torch.randint(0, V, (N,), generator=g)
    print("| dtype | SOFTMAX_ROWS | ms | one pass (512) / this (rounds) |\n|---|---:|---:|---:|")
    for dtype in ("fp32", "bf16"):
        ref = step(h0, w, y, dtype, lm_loss.HEAD_CHUNK)
        for k in values:
            loss, grad = step(h0, w, y, dtype, k)
            assert torch.equal(loss, ref[0]) and torch.equal(grad, ref[1]), (dtype, k)
        times = rounds_of(lambda k: step(h0, w, y, dtype, k), values, args.rounds)
        print_rows(dtype, times, lm_loss.HEAD_CHUNK)
    gemms(h0, w, y, args.rounds)


def rounds_of(run, keys: list, rounds: int, alternate: bool = False) -> dict:
    """ms of run(k) for each k, each round taking every k in turn (the order reversed every
    other round when alternate): {k: [ms per round]}."""
    times = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[::-1] if alternate and r % 2 else keys:
            t0 = time.perf_counter()
            run(k)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def print_rows(label: str, times: dict, base) -> None:
    """One table row per key: its median ms and its rounds' ratios base's time / its time."""
    for k, t in times.items():
        r = [a / b for a, b in zip(times[base], t)]
        print(f"| {label} | {k} | {statistics.median(t):.0f} | "
              f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}) |", flush=True)


def gemms(h0, w, y, rounds: int):
    """fp32, SOFTMAX_ROWS as shipped: both products through oneDNN against both through MKL."""
    found = linear.GEMM
    ref = step(h0, w, y, "fp32", SHIPPED_ROWS, "mkl")
    loss, grad = step(h0, w, y, "fp32", SHIPPED_ROWS, "onednn")
    torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=0)
    # float32 sums in another order: within 1e-5 of the largest entry (test_linear.py's bound)
    torch.testing.assert_close(grad, ref[1], rtol=0, atol=1e-5 * ref[1].abs().max().item())
    times = rounds_of(lambda k: step(h0, w, y, "fp32", SHIPPED_ROWS, k), ["mkl", "onednn"],
                      rounds, alternate=True)
    linear.GEMM = found
    print("\n| dtype | products | ms | MKL's time / this (rounds) |\n|---|---|---:|---:|")
    print_rows("fp32", times, "mkl")


if __name__ == "__main__":
    main()
