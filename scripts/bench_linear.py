"""MKL against oneDNN for the float32 products of GPT-2 small on the CPU (minift/linear.py).

Each product is timed both ways in turn (the order alternating by round) in one process:
torch's own (`F.linear`, `@`: MKL's sgemm) and minift's (`linear.matmul_t`, `linear.matmul`:
oneDNN's inner product). Prints, per product, the median of the rounds' time ratios
(MKL's time / oneDNN's: above 1, oneDNN is faster) with their range, and each side's median
GFLOP/s. The shapes are those of a 4 x 256 LoRA training step (forward x W^T and input
gradient g W of every projection, the LM head's 512-row chunk) and of decoding (1 and 4
rows through c_attn and the LM head).

--quick runs bench.py's tiny shapes (C = 64, V = 1000, one round, at most one pair of
2 x 32 steps): a smoke test, not a measurement.

--steps N also times whole `train()` LoRA steps (scripts/bench.py's `lora` row: GPT-2
small, B = 4, T = 256, LoRA r = 8 with dropout on c_attn, fused AdamW) with linear.GEMM set
to "mkl" and "onednn" in turn on one model, N pairs: the step's time ratio, median and range.

    python scripts/bench_linear.py --rounds 9 [--steps 10]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runs  # noqa: E402  (scripts/bench_runs.py)
import minift.linear as linear  # noqa: E402

C, V = 768, 50257


def shapes(C: int, V: int) -> list[tuple[str, int, int, int, bool]]:
    """(name, rows, out, in, training): x (rows, in) @ W^T with W (out, in); the training
    step's products also time their input gradient g (rows, out) @ W."""
    return [("c_attn", 1024, 3 * C, C, True), ("attn.c_proj", 1024, C, C, True),
            ("c_fc", 1024, 4 * C, C, True), ("mlp.c_proj", 1024, C, 4 * C, True),
            ("lm_head chunk", 512, V, C, True),
            ("c_attn, decoding", 1, 3 * C, C, False), ("c_attn, 4 rows", 4, 3 * C, C, False),
            ("lm_head, decoding", 1, V, C, False), ("lm_head, 4 rows", 4, V, C, False)]


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def compare(mkl, onednn, rounds: int, reps: int) -> tuple[list[float], float, float]:
    """Per round: MKL's time / oneDNN's (each the best of `reps` calls), alternating order."""
    mkl(), onednn()
    ratios, t_mkl, t_dnn = [], [], []
    for r in range(rounds):
        pair = {}
        for name in (("mkl", "onednn") if r % 2 else ("onednn", "mkl")):
            f = mkl if name == "mkl" else onednn
            pair[name] = min(timed(f) for _ in range(reps))
        ratios.append(pair["mkl"] / pair["onednn"])
        t_mkl.append(pair["mkl"])
        t_dnn.append(pair["onednn"])
    return ratios, statistics.median(t_mkl), statistics.median(t_dnn)


def products(rounds: int, C: int, V: int) -> None:
    torch.manual_seed(0)
    print(f"{'product':34s} {'MKL/oneDNN time':>16s} {'range':>12s} {'MKL GFLOP/s':>12s} "
          f"{'oneDNN':>7s}")
    for name, n, out, inp, training in shapes(C, V):
        w = torch.randn(out, inp) * 0.02
        x, g = torch.randn(n, inp), torch.randn(n, out)
        cases = [("x W^T", lambda: F.linear(x, w), lambda: linear.matmul_t(x, w))]
        if training:
            cases.append(("g W", lambda: g @ w, lambda: linear.matmul(g, w)))
        flops = 2 * n * out * inp
        reps = 1 if flops > 2e10 else min(1000, max(1, int(2e9 / flops)))
        for what, mkl, dnn in cases:
            ratios, t_mkl, t_dnn = compare(mkl, dnn, rounds, reps)
            print(f"{name + ', ' + what:34s} {statistics.median(ratios):15.2f}x "
                  f"{min(ratios):5.2f}-{max(ratios):4.2f}x {flops / t_mkl / 1e9:12.0f} "
                  f"{flops / t_dnn / 1e9:7.0f}", flush=True)


def steps(n_pairs: int, quick: bool) -> None:
    case, path, dtype, batch, seq = bench_runs.ROWS["lora"]
    if quick:
        batch, seq = 2, 32
    with tempfile.TemporaryDirectory() as folder:
        shape = bench_runs.QUICK if quick else bench_runs.GPT2_SMALL
        bench_runs.save_reference_model(shape, Path(folder))
        run = bench_runs.make_stepper("minift", case, path, dtype, batch, seq, folder)
    for gemm in ("mkl", "onednn"):  # one warm-up step each
        linear.GEMM = gemm
        run.step()
    ratios = []
    for i in range(n_pairs):
        t = {}
        for gemm in (("mkl", "onednn") if i % 2 else ("onednn", "mkl")):
            linear.GEMM = gemm
            t[gemm] = timed(run.step)
        ratios.append(t["mkl"] / t["onednn"])
        print(f"pair {i + 1}/{n_pairs}: MKL {t['mkl']:.2f} s, oneDNN {t['onednn']:.2f} s, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    linear.GEMM = "onednn"
    print(f"train() LoRA step, MKL's time / oneDNN's: median {statistics.median(ratios):.3f}x "
          f"(pairs {min(ratios):.2f}-{max(ratios):.2f}x, {n_pairs} pairs)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=0, help="also time N pairs of whole steps")
    ap.add_argument("--quick", action="store_true",
                    help="bench.py's tiny shapes (C = 64, V = 1000), 1 round: a smoke test")
    args = ap.parse_args()
    q = bench_runs.QUICK
    c, v = (q.n_embd, q.vocab_size) if args.quick else (C, V)
    if args.quick:
        args.rounds, args.steps = 1, min(args.steps, 1)
    if not linear.uses_onednn(torch.ones(1, 1), torch.ones(1, 1)):
        sys.exit("bench_linear: this torch has no oneDNN (torch.backends.mkldnn.is_available())")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    products(args.rounds, c, v)
    if args.steps:
        steps(args.steps, args.quick)


if __name__ == "__main__":
    main()
