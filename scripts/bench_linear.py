"""MKL against oneDNN for the float32 products of GPT-2 on the CPU (minift/linear.py).

Each product is timed both ways in turn (the order alternating by round) in one process:
torch's own (`F.linear`, `@`: MKL's sgemm) and oneDNN's inner product (the op minift's
`linear.matmul_t` and `linear.matmul` call). Prints, per product, the median of the rounds'
time ratios (MKL's time / oneDNN's: above 1, oneDNN is faster) with their range, each side's
median GFLOP/s, and which of the two minift uses there (linear.uses_onednn: small products
stay with MKL). The shapes are those of a 4 x 256 training step (forward x W^T, input
gradient g W and weight gradient g^T x of every projection, the LM head's 512-row chunk's
first two) and of decoding and short batches (1, 4, 16 and 64 rows through c_attn, 1 and 4
through the LM head), for GPT-2 small or (--shape tiny) the embedded minift-tiny (C = 256,
V = 4096).

--quick runs bench.py's tiny shapes (C = 64, V = 1000, one round, at most one pair of
2 x 32 steps): a smoke test, not a measurement.

--generate also times greedy generation with the embedded minift-tiny (16-token prompts,
64 new tokens, batches 1, 4 and 8) under MKL everywhere, oneDNN from linear.MIN_MACS
(minift's default) and oneDNN at every size: why small products stay with MKL.

--steps N also times whole `train()` LoRA steps (scripts/bench.py's `lora` row: GPT-2
small, B = 4, T = 256, LoRA r = 8 with dropout on c_attn, fused AdamW) with linear.GEMM set
to "mkl" and "onednn" in turn on one model, N pairs: the step's time ratio, median and range.

    python scripts/bench_linear.py --rounds 9 [--steps 10] [--shape tiny] [--generate]
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

WIDTHS = {"small": (768, 50257), "tiny": (256, 4096)}   # (C, V): GPT-2 small, minift-tiny


def shapes(C: int, V: int) -> list[tuple[str, int, int, int, bool]]:
    """(name, rows, out, in, training): x (rows, in) @ W^T with W (out, in); the training
    step's products also time their input gradient g (rows, out) @ W."""
    return [("c_attn", 1024, 3 * C, C, True), ("attn.c_proj", 1024, C, C, True),
            ("c_fc", 1024, 4 * C, C, True), ("mlp.c_proj", 1024, C, 4 * C, True),
            ("lm_head chunk", 512, V, C, True),
            ("c_attn, decoding", 1, 3 * C, C, False), ("c_attn, 4 rows", 4, 3 * C, C, False),
            ("c_attn, 16 rows", 16, 3 * C, C, False), ("c_attn, 64 rows", 64, 3 * C, C, False),
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
          f"{'oneDNN':>7s} {'minift uses':>12s}")
    for name, n, out, inp, training in shapes(C, V):
        w = torch.randn(out, inp) * 0.02
        x, g = torch.randn(n, inp), torch.randn(n, out)
        # (what, MKL's product, oneDNN's operands a, b for a b^T, as linear.py passes them)
        cases = [("x W^T", lambda: F.linear(x, w), x, w)]
        if training:
            cases.append(("g W", lambda: g @ w, g, w.t()))
        if training and name != "lm_head chunk":  # the head's accumulates through addmm
            cases.append(("g^T x", lambda: g.t() @ x, g.t(), x.t()))
        flops = 2 * n * out * inp
        reps = 1 if flops > 2e10 else min(1000, max(1, int(2e9 / flops)))
        for what, mkl, a, b in cases:
            ratios, t_mkl, t_dnn = compare(mkl, lambda: linear._onednn_t(a, b), rounds, reps)
            uses = "oneDNN" if linear.uses_onednn(a, b) else "MKL"
            print(f"{name + ', ' + what:34s} {statistics.median(ratios):15.2f}x "
                  f"{min(ratios):5.2f}-{max(ratios):4.2f}x {flops / t_mkl / 1e9:12.0f} "
                  f"{flops / t_dnn / 1e9:7.0f} {uses:>12s}", flush=True)


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


def generation(rounds: int, batches: list[int], new: int = 64) -> None:
    """Greedy KV-cache generation with the embedded minift-tiny under three kernel choices,
    in turn (order alternating by round): MKL everywhere, oneDNN from linear.MIN_MACS (minift's
    default) and oneDNN at every size. Speed against MKL everywhere, median and range."""
    from minift import GPT
    model = GPT.from_pretrained("minift-tiny").eval()
    gemm, min_macs = linear.GEMM, linear.MIN_MACS
    choices = {"MKL everywhere": ("mkl", min_macs), "oneDNN from MIN_MACS": ("onednn", min_macs),
               "oneDNN at every size": ("onednn", 0)}
    for batch in batches:
        ids = torch.randint(0, model.config.vocab_size, (batch, 16),
                            generator=torch.Generator().manual_seed(0))
        times, outs = {k: [] for k in choices}, {}
        with torch.no_grad():
            for r in range(rounds + 1):                          # round 0: warm-up
                for name in (list(choices) if r % 2 else list(choices)[::-1]):
                    linear.GEMM, linear.MIN_MACS = choices[name]
                    t0 = time.perf_counter()
                    outs[name] = model.generate(ids, max_new_tokens=new, use_cache=True)
                    if r:
                        times[name].append(time.perf_counter() - t0)
        linear.GEMM, linear.MIN_MACS = gemm, min_macs
        same = all(torch.equal(o, outs["MKL everywhere"]) for o in outs.values())
        for name in choices:
            rs = [a / b for a, b in zip(times["MKL everywhere"], times[name])]
            print(f"minift-tiny generate, batch {batch}, {name:22s} "
                  f"{batch * new / statistics.median(times[name]):7.0f} new tokens/s, "
                  f"x MKL {statistics.median(rs):.2f} ({min(rs):.2f}-{max(rs):.2f})", flush=True)
        print(f"  same token ids: {same}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=0, help="also time N pairs of whole steps")
    ap.add_argument("--generate", action="store_true",
                    help="also time minift-tiny's greedy generation at batches 1, 4 and 8 "
                         "under each kernel choice")
    ap.add_argument("--shape", choices=tuple(WIDTHS), default="small",
                    help="the products' widths: GPT-2 small's or minift-tiny's")
    ap.add_argument("--quick", action="store_true",
                    help="bench.py's tiny shapes (C = 64, V = 1000), 1 round: a smoke test")
    args = ap.parse_args()
    q = bench_runs.QUICK
    c, v = (q.n_embd, q.vocab_size) if args.quick else WIDTHS[args.shape]
    if args.quick:
        args.rounds, args.steps = 1, min(args.steps, 1)
    if not linear._HAVE_ONEDNN:
        sys.exit("bench_linear: this torch has no oneDNN (torch.backends.mkldnn.is_available())")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"C = {c}, V = {v}")
    products(args.rounds, c, v)
    if args.steps:
        steps(args.steps, args.quick)
    if args.generate:
        generation(args.rounds, [1] if args.quick else [1, 4, 8], new=4 if args.quick else 64)


if __name__ == "__main__":
    main()
