"""minift's training step against transformers + PEFT's, one step each in turn: a speed
ratio that a shared machine's changing load cannot tilt toward either side.

    python scripts/bench_paired.py                          # the `lora` row, 24 pairs
    python scripts/bench_paired.py --row "plain lora" --pairs 40 --out paired.json

bench.py runs each stack in its own process, one after the other, for a few steps each
(about 30 s a run), and keeps each run's best round. On a shared machine whose speed moves
by 10-30% from minute to minute, a slow minute then lands on one side only: the same row's
one-round ratios have spanned 0.84x to 1.64x. Here both stacks are loaded at once, each in
its own process with bench.py's model, adapter, batch and optimizer (`bench_runs.make_stepper`);
after the warm-up steps the parent asks them for one step at a time, A B B A A B ..., so
that a drift in the machine's speed falls on both sides alike, and the one waiting (blocked
on a pipe) uses no CPU. Pair i gives r_i = t_reference / t_minift. Reported: the geometric
mean of the r_i with a 95% interval, their median and range, and each side's median step.
The load changes over minutes, so neighbouring pairs are correlated: the interval is a
moving-block bootstrap of the mean log r_i (minift.stats.bootstrap_ci with block=--block),
resampling runs of that many consecutive pairs, which keeps the correlation inside each run
and so widens the interval as far as the data says it should (--block 1: the plain
bootstrap, pairs independent).
Peak memory is bench.py's (here both are resident).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench  # scripts/bench.py, beside this file: its targets
import bench_runs  # its model, adapter, batch and step; it imports minift only where minift runs


MARK = "@bench_paired "   # starts every line a worker writes for the parent


def worker(args) -> None:
    """Load the run, take the warm-up steps, then one timed step per line read on stdin."""
    case, path, dtype, batch, seq = shape_of(args)
    run = bench_runs.make_stepper(args.run, case, path, dtype, batch, seq, args.model_dir)
    for _ in range(args.warmup):
        run.step()
    print(MARK + "ready", flush=True)
    for _ in sys.stdin:
        bench_runs.sync()
        t0 = time.perf_counter()
        loss = run.step()
        bench_runs.sync()
        print(MARK + json.dumps({"s": time.perf_counter() - t0, "loss": loss}), flush=True)


def shape_of(args) -> tuple:
    """The row's (case, path, dtype, batch, seq); --quick: a 2 x 32 batch."""
    case, path, dtype, batch, seq = bench_runs.ROWS[args.row]
    return (case, path, dtype, 2, 32) if args.quick else (case, path, dtype, batch, seq)


def start(name: str, args, folder: Path) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", "--run", name, "--row", args.row,
           "--warmup", str(args.warmup), "--model-dir", str(folder)] + ["--quick"] * args.quick
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL)
    if _line(proc) != "ready":
        raise SystemExit(f"bench_paired: the {name} worker failed to start ({cmd})")
    return proc


def _line(proc: subprocess.Popen) -> str:
    """The worker's next line of ours (a library may print its own lines to stdout too)."""
    for line in proc.stdout:
        if line.startswith(MARK):
            return line[len(MARK):].strip()
    raise SystemExit(f"bench_paired: a worker exited (code {proc.wait()})")


def one_step(proc: subprocess.Popen) -> dict:
    proc.stdin.write("step\n")
    proc.stdin.flush()
    return json.loads(_line(proc))


BLOCK = 6   # pairs per run of the block bootstrap: about 80 s of GPT-2 small's ~13 s pairs


def summary(ref_s: list[float], ours_s: list[float], tokens: int, block: int = BLOCK) -> dict:
    """The paired ratios' geometric mean with its block-bootstrap interval, median, range."""
    from minift.stats import bootstrap_ci   # here, not at the top: workers need no minift
    logs = [math.log(r / m) for r, m in zip(ref_s, ours_s)]
    ci = bootstrap_ci(logs, block=block)
    ratios = sorted(math.exp(x) for x in logs)
    return {"pairs": len(logs), "block": block, "ratio": math.exp(ci["mean"]),
            "low": math.exp(ci["low"]), "high": math.exp(ci["high"]),
            "median": statistics.median(ratios),
            "min": ratios[0], "max": ratios[-1],
            "ref_tokens_per_s": tokens / statistics.median(ref_s),
            "minift_tokens_per_s": tokens / statistics.median(ours_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", default="lora",
                    help=f"one of bench.py's rows {tuple(bench_runs.ROWS)}")
    ap.add_argument("--pairs", type=int, default=24, help="timed steps per stack")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first, each stack")
    ap.add_argument("--block", type=int, default=BLOCK,
                    help="consecutive pairs per run of the block bootstrap (1: pairs independent)")
    ap.add_argument("--shape", choices=tuple(bench_runs.SHAPES), default="small")
    ap.add_argument("--quick", action="store_true",
                    help="bench.py's tiny model, a 2 x 32 batch: a smoke test")
    ap.add_argument("--target", type=float, default=None,
                    help="a ratio to judge against (default: issue 13's for the row, if any)")
    ap.add_argument("--out", help="write every step's time to this JSON file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row not in bench_runs.ROWS:
        ap.error(f"unknown row {args.row!r}; choose from {tuple(bench_runs.ROWS)}")
    if args.pairs < 2 or args.block < 1:
        ap.error("--pairs must be at least 2 and --block at least 1")
    if args.worker:
        return worker(args)
    case, path, dtype, batch, seq = shape_of(args)
    shape = bench_runs.QUICK if args.quick else bench_runs.SHAPES[args.shape]
    target = args.target or next((lim for row, what, lim in bench.TARGETS
                                  if row == args.row and what == "speed"), None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-random"
        bench_runs.save_reference_model(shape, folder)
        procs = {name: start(name, args, folder) for name in (bench_runs.REFERENCE, "minift")}
        times = {name: [] for name in procs}
        for i in range(args.pairs):   # A B, then B A: the order alternates pair by pair
            order = list(procs) if i % 2 == 0 else list(procs)[::-1]
            for name in order:
                times[name].append(one_step(procs[name])["s"])
            print(f"pair {i + 1}/{args.pairs}: ref {times[bench_runs.REFERENCE][-1]:.2f} s, "
                  f"minift {times['minift'][-1]:.2f} s", file=sys.stderr, flush=True)
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    s = summary(times[bench_runs.REFERENCE], times["minift"], batch * seq, args.block)
    print(f"row {args.row!r} ({case}, {path}, {dtype}, {batch}x{seq}), "
          f"{'the quick shape' if args.quick else 'GPT-2 ' + args.shape}, "
          f"{s['pairs']} pairs after {args.warmup} warm-up steps each")
    print(f"median step: transformers+peft {s['ref_tokens_per_s']:.1f} tokens/s, "
          f"minift {s['minift_tokens_per_s']:.1f}")
    print(f"minift / reference speed: {s['ratio']:.3f}x (95% CI {s['low']:.3f}-{s['high']:.3f}, "
          f"blocks of {s['block']} pairs; "
          f"median pair {s['median']:.3f}, pairs {s['min']:.2f}-{s['max']:.2f})")
    if target is not None:
        verdict = ("met" if s["low"] >= target else "missed" if s["high"] < target
                   else "undecided: the interval contains it")
        print(f"target >= {target}x: {verdict}")
    if args.out:
        Path(args.out).write_text(json.dumps({"row": args.row, "times": times, **s}, indent=2))


if __name__ == "__main__":
    main()
