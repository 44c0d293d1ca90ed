"""Greedy generation with the KV cache, minift against transformers, side by side.

Both stacks load the same random GPT-2 (small by default; written once with transformers'
save_pretrained) in fp32 and eval mode, and continue the same prompts (B random prompts of
P tokens) by N new tokens, greedily, with the KV cache and no end-of-text stop. They take
turns in one process, the order alternating by round; each round's ratio is transformers'
time over minift's. Prints the median ratio with its range, each side's median new tokens
per second, and whether the two produced the same token ids (they should, up to a greedy
tie that float32 rounding breaks differently). `--gemm mkl` runs minift on torch's own
products (minift.linear.GEMM), to see what oneDNN's products add.

    python scripts/bench_generate.py --rounds 5 [--batch 4 --prompt 32 --new 128] [--gemm mkl]
    python scripts/bench_generate.py --quick     # a tiny model, one round: a smoke test
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minift.linear as linear  # noqa: E402
from minift import GPT  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--shape", choices=("small", "medium"), default="small")
    ap.add_argument("--gemm", choices=("onednn", "mkl"), default=linear.GEMM)
    ap.add_argument("--quick", action="store_true",
                    help="a 2-layer, 64-wide model, 2 prompts of 8 tokens, 8 new, 1 round: "
                         "a smoke test")
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel
    linear.GEMM = args.gemm
    config = (GPT2Config() if args.shape == "small"
              else GPT2Config(n_layer=24, n_head=16, n_embd=1024))
    if args.quick:
        config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=1000, n_positions=128)
        args.rounds, args.batch, args.prompt, args.new, args.shape = 1, 2, 8, 8, "tiny (--quick)"
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(folder)
        theirs = GPT2LMHeadModel.from_pretrained(folder).eval()
        ours = GPT.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)

    def run_theirs():
        return theirs.generate(ids, attention_mask=mask, max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, use_cache=True,
                               pad_token_id=config.eos_token_id)

    def run_ours():
        return ours.generate(ids, max_new_tokens=args.new, use_cache=True)

    stacks = {"transformers": run_theirs, "minift": run_ours}
    times = {k: [] for k in stacks}
    outputs = {}
    with torch.no_grad():
        for name, f in stacks.items():   # warm-up
            outputs[name] = f()
        for r in range(args.rounds):
            for name in (("transformers", "minift") if r % 2 else ("minift", "transformers")):
                t0 = time.perf_counter()
                stacks[name]()
                times[name].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["transformers"], times["minift"])]
    new = args.batch * args.new
    same = torch.equal(outputs["transformers"], outputs["minift"])
    print(f"GPT-2 {args.shape}, {args.batch} prompts of {args.prompt} tokens, {args.new} new "
          f"each, greedy with the KV cache, fp32, {torch.get_num_threads()} threads, "
          f"minift's products: {args.gemm}, {args.rounds} rounds")
    for name in stacks:
        print(f"  {name:12s} {new / statistics.median(times[name]):7.1f} new tokens/s")
    print(f"minift / transformers speed: {statistics.median(ratios):.2f}x "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x); same token ids: {same}")


if __name__ == "__main__":
    main()
