"""RSS of training on a large text corpus: the memory-mapped token file against the
in-memory list of blocks, each in a fresh subprocess, interleaved and repeated.

    nice -n 10 python scripts/bench_mmap.py --mb 300 --memory-mb 30 --repeat 2

A corpus of --mb megabytes of blank-line-separated documents is generated in a temporary
folder (and removed after). Each run loads the embedded minift-tiny model and tokenizer,
resets the kernel's peak-RSS counter (/proc/self/clear_refs, Linux), then loads the corpus
and trains --steps optimizer steps on it. Printed per run: the peak RSS growth over the
baseline (VmHWM after the reset minus VmRSS before), split into load and train phases.
The memmap runs tokenise the big corpus once into a fresh cache (the first repeat) and
reuse it after; the in-memory runs use the first --memory-mb megabytes of the same corpus
(all of it would not fit in memory), so its growth per corpus MB is printed for the ratio.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """Documents of 20-400 pseudo-words, blank lines between; 16 distinct 1 MB chunks cycled."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randrange(1, 9))) for _ in range(5000)]
    chunks = []
    for _ in range(16):
        docs, size = [], 0
        while size < 2**20:
            doc = " ".join(rng.choice(words) for _ in range(rng.randrange(20, 400))) + "."
            docs.append(doc)
            size += len(doc) + 2
        chunks.append(("\n\n".join(docs) + "\n\n").encode())
    with open(path, "wb") as f:
        for i in range(megabytes):
            f.write(chunks[i % len(chunks)])


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> None:
    """One measured run (in its own process); prints one JSON line."""
    import torch
    from minift import GPT, Tokenizer, TrainConfig, load_dataset, train
    torch.set_num_threads(args.threads)
    tok, model = Tokenizer.from_pretrained("minift-tiny"), GPT.from_pretrained("minift-tiny")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    base = rss_kb("VmRSS")
    t0 = time.perf_counter()
    data = load_dataset(args.corpus, tok, block_size=args.block, memmap=args.mode == "memmap",
                        cache_dir=args.cache)
    t_load, after_load = time.perf_counter() - t0, rss_kb("VmHWM")
    t0 = time.perf_counter()
    result = train(model, data, config=TrainConfig(max_steps=args.steps, batch_size=8, lr=1e-4,
                                                   log_every=10**9, eval_every=10**9, bf16=False))
    t_train = time.perf_counter() - t0
    print(json.dumps({"mode": args.mode, "blocks": len(data), "load_s": round(t_load, 1),
                      "train_s": round(t_train, 1), "baseline_mb": base / 1024,
                      "load_growth_mb": (after_load - base) / 1024,
                      "peak_growth_mb": (rss_kb("VmHWM") - base) / 1024,
                      "final_loss": result.train_loss[-1]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=300, help="corpus size for the memmap runs")
    p.add_argument("--memory-mb", type=int, default=30, help="corpus size for the in-memory runs")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["memmap", "memory"])
    p.add_argument("--corpus")
    p.add_argument("--cache")
    args = p.parse_args()
    if args.child:
        return child(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench_mmap-"))
    try:
        big, small = tmp / "big.txt", tmp / "small.txt"
        write_corpus(big, args.mb)
        write_corpus(small, args.memory_mb)
        print(f"corpus: {big.stat().st_size / 2**20:.0f} MB (memmap), "
              f"{small.stat().st_size / 2**20:.0f} MB (in memory); {args.steps} steps of "
              f"batch 8 x {args.block} tokens on minift-tiny", flush=True)
        rows = []
        for r in range(args.repeat):
            for mode, corpus in (("memmap", big), ("memory", small)):  # interleaved
                cmd = [sys.executable, __file__, "--child", "--mode", mode, "--corpus", str(corpus),
                       "--cache", str(tmp / "cache"), "--steps", str(args.steps),
                       "--block", str(args.block), "--threads", str(args.threads)]
                out = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                text=True).stdout.strip().splitlines()[-1])
                out["repeat"], out["corpus_mb"] = r, corpus.stat().st_size / 2**20
                rows.append(out)
                print(f"  repeat {r} {mode:6s}: {out['corpus_mb']:5.0f} MB corpus, "
                      f"{out['blocks']:8d} blocks, load {out['load_s']:6.1f} s, train "
                      f"{out['train_s']:5.1f} s | RSS growth: load {out['load_growth_mb']:7.1f} MB, "
                      f"peak {out['peak_growth_mb']:7.1f} MB", flush=True)
        for mode in ("memmap", "memory"):
            runs = [x for x in rows if x["mode"] == mode]
            worst = max(x["peak_growth_mb"] for x in runs)
            per_mb = worst / runs[0]["corpus_mb"]
            print(f"{mode:6s}: worst peak RSS growth {worst:.1f} MB over {runs[0]['corpus_mb']:.0f}"
                  f" MB of text = {per_mb:.3f} MB per corpus MB")
        mm = max(x["peak_growth_mb"] for x in rows if x["mode"] == "memmap")
        mem = [x for x in rows if x["mode"] == "memory"]
        mem_per_mb = max(x["peak_growth_mb"] for x in mem) / mem[0]["corpus_mb"]
        print(f"in-memory growth extrapolated to {args.mb} MB: {mem_per_mb * args.mb:.0f} MB; "
              f"memmap / in-memory: {mm / (mem_per_mb * args.mb):.3f}")
        print(f"target: memmap peak growth < 100 MB: {'met' if mm < 100 else 'MISSED'} ({mm:.1f} MB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
