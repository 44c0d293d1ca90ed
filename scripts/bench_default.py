"""Real (non-pad) tokens per second of the default `minift finetune` job against the same job
with packing and bf16 autocast off, interleaved and repeated:

    python scripts/bench_default.py [--steps 40] [--rounds 3]

Each run is a fresh `minift finetune` process (the built-in task, LoRA, the CLI's defaults)
with no evaluation, no forgetting measurement and no samples, so the timed work is the
training loop alone. Its throughput is the median of the metrics.jsonl `tokens_per_s` lines
after the first (which holds the warm-up); train() counts a step's tokens as the sum of its
attention masks, so padding never counts. Prints each round's ratio and their spread.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"defaults (packing, bf16 where native)": [],
            "--no-packing --no-bf16": ["--no-packing", "--no-bf16"]}


def tokens_per_s(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in lines if r.get("event") == "train"][1:]
    if not rates:
        raise SystemExit(f"{run_dir}/metrics.jsonl: fewer than two train lines; raise --steps")
    return statistics.median(rates)


def run_once(extra: list[str], steps: int, log_every: int, folder: Path) -> float:
    cmd = [sys.executable, "-m", "minift", "finetune", "--max-steps", str(steps),
           "--log-every", str(log_every), "--eval-every", str(10 * steps), "--no-forgetting",
           "--no-eval-before", "--eval-samples", "0", "--num-samples", "0",
           "--output-dir", str(folder), "--overwrite", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return tokens_per_s(folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    names = list(VARIANTS)
    rates: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]   # alternate who goes first
            for name in order:
                rates[name].append(run_once(VARIANTS[name], args.steps, args.log_every,
                                            Path(tmp) / f"r{r}"))
            ratio = rates[names[0]][-1] / rates[names[1]][-1]
            print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:,.0f}" for n in names)
                  + f" real tokens/s -> {ratio:.2f}x", flush=True)
    ratios = [a / b for a, b in zip(rates[names[0]], rates[names[1]])]
    print(f"median {statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}x); "
          + ", ".join(f"{n}: median {statistics.median(rates[n]):,.0f} tokens/s" for n in names))


if __name__ == "__main__":
    main()
