"""RSS of training on a large text corpus: the memory-mapped token file against the
in-memory list of blocks, each run in a fresh subprocess, interleaved and repeated.

    nice -n 10 python scripts/bench_mmap.py --mb 300 --memory-mb 30 --repeat 2

Corpora of blank-line-separated documents are generated in a temporary folder (removed
after): --mb megabytes for the memory-mapped run, 1 MB for a baseline run of the same
training on a corpus too small to matter, --memory-mb for the in-memory run (all --mb
would not fit in memory). Each run loads the embedded minift-tiny model and tokenizer,
resets the kernel's peak-RSS counter (/proc/self/clear_refs, Linux), loads its corpus and
trains --steps optimizer steps. The training step itself (activations, AdamW state,
allocator pools) costs the same whatever the corpus, so the corpus's cost is a run's peak
RSS minus the 1 MB baseline's; the target is < 100 MB for the --mb memmap corpus. Also
printed: RSS growth from the first to the last training step (flat = the corpus is not
accumulating in memory). The memmap runs tokenise into a fresh cache on the first repeat
and reuse it after.
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
    t0, step_rss = time.perf_counter(), []
    result = train(model, data, config=TrainConfig(max_steps=args.steps, batch_size=8, lr=1e-4,
                                                   log_every=10**9, eval_every=10**9, bf16=False),
                   callback=lambda info: step_rss.append(rss_kb("VmRSS")))
    t_train = time.perf_counter() - t0
    print(json.dumps({"mode": args.mode, "blocks": len(data), "load_s": round(t_load, 1),
                      "train_s": round(t_train, 1), "baseline_mb": base / 1024,
                      "load_growth_mb": (after_load - base) / 1024,
                      "peak_growth_mb": (rss_kb("VmHWM") - base) / 1024,
                      "step_growth_mb": (max(step_rss) - step_rss[0]) / 1024,
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
        corpora = {"memmap": tmp / "big.txt", "baseline": tmp / "one.txt", "memory": tmp / "mid.txt"}
        for path, mb in zip(corpora.values(), (args.mb, 1, args.memory_mb)):
            write_corpus(path, mb)
        print(f"corpora: {args.mb} MB (memmap), 1 MB (memmap baseline), {args.memory_mb} MB (in "
              f"memory); {args.steps} steps of batch 8 x {args.block} tokens on minift-tiny",
              flush=True)
        rows = []
        for r in range(args.repeat):
            for mode, corpus in corpora.items():  # interleaved
                cmd = [sys.executable, __file__, "--child", "--mode",
                       "memory" if mode == "memory" else "memmap", "--corpus", str(corpus),
                       "--cache", str(tmp / "cache"), "--steps", str(args.steps),
                       "--block", str(args.block), "--threads", str(args.threads)]
                out = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                text=True).stdout.strip().splitlines()[-1])
                out.update(run=mode, repeat=r, corpus_mb=corpus.stat().st_size / 2**20)
                rows.append(out)
                print(f"  repeat {r} {mode:8s}: {out['corpus_mb']:5.0f} MB, {out['blocks']:8d} "
                      f"blocks, load {out['load_s']:6.1f} s, train {out['train_s']:6.1f} s | RSS "
                      f"growth: load {out['load_growth_mb']:6.1f} MB, peak "
                      f"{out['peak_growth_mb']:6.1f} MB, first->last step "
                      f"{out['step_growth_mb']:5.1f} MB", flush=True)
        peak = {m: [x["peak_growth_mb"] for x in rows if x["run"] == m] for m in corpora}
        base = min(peak["baseline"])
        mm = max(peak["memmap"]) - base
        mem_per_mb = (max(peak["memory"]) - base) / args.memory_mb
        steps = max(x["step_growth_mb"] for x in rows if x["run"] == "memmap")
        print(f"peak RSS over the 1 MB baseline's ({base:.1f} MB growth): memmap {args.mb} MB: "
              f"{mm:+.1f} MB (worst of {args.repeat}); in memory {args.memory_mb} MB: "
              f"{mem_per_mb * args.memory_mb:+.1f} MB = {mem_per_mb:.1f} MB per corpus MB, "
              f"{mem_per_mb * args.mb:.0f} MB extrapolated to {args.mb} MB "
              f"(memmap / in-memory {mm / (mem_per_mb * args.mb):.3f})")
        print(f"memmap RSS growth from the first to the last step: {steps:.1f} MB (worst)")
        print(f"target: the {args.mb} MB corpus adds < 100 MB RSS: "
              f"{'met' if mm < 100 else 'MISSED'} ({mm:.1f} MB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
