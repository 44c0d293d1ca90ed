"""Training-step speed and peak memory of minift against transformers + PEFT.

    python scripts/bench.py                        # GPT-2 small, every case, CUDA if present
    python scripts/bench.py --quick                # tiny config, 1 step: a smoke test
    python scripts/bench.py --cases lora,masked --steps 5 --out bench.json

Both stacks load the same random GPT-2 small (GPT2Config() defaults, written once with
transformers' save_pretrained to a temporary folder), in fp32, in train mode with GPT-2's
dropouts (0.1), and train on the same batch (4 x 256 random tokens, labels = inputs) with
the same adapter and the same optimizer (torch.optim.AdamW(fused=True), lr 1e-4, weight
decay 0.01, on the trainable parameters only; transformers' Trainer defaults to this fused
AdamW too; --optimizer picks another). Every run is its own process, so its peak resident
memory (ru_maxrss: model loading included) is its own. With --repeat, each run's fastest
tokens/s is kept and its median peak RSS (which moves by a few hundred MB between identical
runs, with how the heap happens to fragment). The cases:

  lora    LoRA r=8, alpha=16, dropout 0.1 on c_attn (Hu et al. 2021, §4.1)
  full    every parameter trained
  prefix  prefix tuning, 20 virtual tokens (Li & Liang 2021)
  masked  LoRA on a prompt/completion batch: labels -100 on the first half of each row

The reference runs transformers + PEFT eagerly (use_cache=False, the training setting).
minift runs eagerly and with `compile_blocks` (one compiled block; the cold-compile time is
the first step minus a steady step, with an empty inductor cache unless --warm-cache).
minift computes the LM head only at target positions (masked_lm_loss); the reference
computes it at every position, as transformers does.

The lower bound: the step's matmul FLOPs counted from the shapes (forward, plus in the
backward the input gradient of every layer that needs one and weight gradients of trainable
weights only; the LM head at target tokens only: the work the task needs), divided by this
machine's best fp32 matmul rate (a 2048^3 torch.mm). `of bound` is tokens/s over that.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CASES = ("lora", "full", "prefix", "masked")
RUNS = {  # name -> (stack, compiled)
    "transformers+peft": ("hf", False),
    "minift": ("minift", False),
    "minift compiled": ("minift", True),
}
REFERENCE = "transformers+peft"
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["c_attn"])
N_PREFIX = 20
LR, WEIGHT_DECAY = 1e-4, 0.01

# Targets of GitHub issue 5 (ratios against the reference; None: no target).
TARGETS = {"lora": (1.1, 0.45), "full": (1.05, 0.6), "masked": (1.2, None), "prefix": (None, None)}
BOUND_TARGET = 0.70       # LoRA reaches 70% of the matmul lower bound
COMPILE_TARGET_S = 60.0   # cold compile overhead on GPT-2 small
LOSS_TOL = 1e-5           # compiled vs eager loss


@dataclass
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int


GPT2_SMALL = Shape(12, 12, 768, 50257, 1024)
QUICK = Shape(2, 2, 64, 1000, 128)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_batch(vocab_size, batch, seq, case):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    labels = ids.clone()
    if case == "masked":
        labels[:, : seq // 2] = -100  # the prompt half carries no loss
    return ids, labels


# ---------------------------------------------------------------------------- FLOPs
def attention_flops(s: Shape, case: str, batch: int, seq: int, causal: bool = True) -> int:
    """One layer's QK^T and AV FLOPs over all heads, over the (query, key) pairs computed."""
    P = N_PREFIX if case == "prefix" else 0
    pairs = batch * (seq * P + (seq * (seq + 1) // 2 if causal else seq * seq))
    return 2 * 2 * s.n_embd * pairs


def matmul_flops(s: Shape, case: str, batch: int, seq: int, n_target: int,
                 head_tokens: int | None = None, causal: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) of one training step, forward + backward.

    The forward runs every matmul; the backward computes the input gradients autograd needs
    (the same FLOPs again; attention's dP, dQ, dK, dV twice its forward) and weight gradients
    of trainable weights only. Nothing below block 0's c_attn trains except in full
    fine-tuning, so that layer needs no input gradient (nor block 0's queries, with a prefix).
    head_tokens: positions through the LM head (default: the n_target targets, the work the
    task needs). causal=True counts only the (query, key) pairs a causal mask keeps; False
    counts the full square, as SDPA's math kernel computes it under attention dropout.
    """
    C, L, V, N, r = s.n_embd, s.n_layer, s.vocab_size, batch * seq, LORA["r"]
    head_tokens = n_target if head_tokens is None else head_tokens
    P = N_PREFIX if case == "prefix" else 0
    uses_lora = case in ("lora", "masked")
    attn = attention_flops(s, case, batch, seq, causal)    # one layer's forward
    proj = 2 * N * (3 * C * C + C * C + 2 * 4 * C * C)     # c_attn, attn.c_proj, c_fc, mlp.c_proj
    lora = 2 * N * r * (C + 3 * C) if uses_lora else 0     # (x A^T) B^T on c_attn (in C, out 3C)
    head = 2 * head_tokens * C * V

    forward = L * (proj + attn + lora) + head
    backward = L * (proj + 2 * attn + 2 * lora) + head     # input gradients
    if case == "full":
        backward += L * proj + head                        # weight gradients (head tied to wte)
    else:
        backward -= 2 * N * 3 * C * C                      # no input gradient into block 0
        if uses_lora:
            backward -= 2 * N * r * C                      # ... nor through its lora_A
        if P:
            backward -= attn // 2                          # block 0's queries: no dQ
    return forward + backward


# ---------------------------------------------------------------------------- workers
def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def worker_matmul(args) -> dict:
    """Best fp32 rate of a (n x n) @ (n x n) torch.mm, in FLOP/s."""
    n, dev = 2048, device()
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    best = float("inf")
    for _ in range(args.matmul_reps):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return {"matmul_flops_per_s": 2 * n**3 / best}


def build_hf(folder, case):
    import peft
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(device())
    if case in ("lora", "masked"):
        # GPT-2 stores Conv1D weights (in, out): PEFT needs fan_in_fan_out=True for them
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="CAUSAL_LM", fan_in_fan_out=True, **LORA))
    elif case == "prefix":
        model = peft.get_peft_model(model, peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N_PREFIX))
    return model.train(), (lambda ids, labels: model(input_ids=ids, labels=labels,
                                                     use_cache=False).loss)


def build_minift(folder, case, compiled):
    from minift import GPT
    from minift.model import compile_blocks
    from minift.peft import LoraConfig, PrefixTuningConfig, get_peft_model
    model = GPT.from_pretrained(folder, device=device())
    if case in ("lora", "masked"):
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    elif case == "prefix":
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                         num_virtual_tokens=N_PREFIX))
    if compiled:
        compile_blocks(model)
    return model.train(), (lambda ids, labels: model(ids, labels=labels,
                                                     return_logits=False).loss)


def worker_run(args) -> dict:
    torch.manual_seed(0)
    stack, compiled = RUNS[args.run]
    folder = Path(args.model_dir)
    if stack == "hf":
        model, loss_fn = build_hf(folder, args.case)
    else:
        model, loss_fn = build_minift(folder, args.case, compiled)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids, labels = (t.to(device()) for t in make_batch(vocab, args.batch, args.seq, args.case))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "minift" and stack == "minift":
        from minift import AdamW
        opt = AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    else:  # "minift" keeps torch's for the reference
        opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY,
                                fused=args.optimizer == "torch-fused")

    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        sync()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    out = {
        "tokens_per_s": args.batch * args.seq * len(timed) / sum(timed),
        "step_s": statistics.median(timed), "first_step_s": times[0],
        "first_step_overhead_s": times[0] - statistics.median(timed),
        "losses": losses, "peak_rss_gb": peak_rss_gb(),
        "trainable_params": sum(p.numel() for p in trainable),
    }
    if torch.cuda.is_available():
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if compiled:  # same weights, dropout off: compiled and eager forward must agree
        model.eval()
        with torch.no_grad():
            loss_c = loss_fn(ids, labels).item()
            with torch.compiler.set_stance("force_eager"):
                loss_e = loss_fn(ids, labels).item()
        out["eval_loss_compiled"], out["eval_loss_eager"] = loss_c, loss_e
    return out


# ---------------------------------------------------------------------------- parent
def spawn(argv: list[str], env_extra: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, **(env_extra or {})}
        cmd = [sys.executable, __file__, *argv, "--result", str(result)]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        if proc.returncode != 0:
            return {"error": proc.stdout[-3000:]}
        return json.loads(result.read_text())


def save_reference_model(shape: Shape, folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config() if shape == GPT2_SMALL else GPT2Config(**vars(shape))
    GPT2LMHeadModel(cfg).save_pretrained(folder)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def report(results: dict, meta: dict) -> list[str]:
    rate = meta["matmul_flops_per_s"]
    lines = [f"device {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, "
             f"transformers {meta['transformers']}, peft {meta['peft']}",
             f"model {meta['shape']}, batch {meta['batch']} x {meta['seq']} tokens, "
             f"{meta['steps']} timed steps after {meta['warmup']} warm-up",
             f"fp32 matmul rate {rate / 1e9:.1f} GFLOP/s (best 2048^3 torch.mm)", ""]
    head = (f"{'case':7} {'run':18} {'tokens/s':>9} {'x ref':>6} {'peak GB':>8} {'x ref':>6} "
            f"{'GFLOP/tok':>9} {'bound t/s':>9} {'of bound':>8} {'1st step':>8} {'overhead':>8}")
    lines += [head, "-" * len(head)]
    for case, runs in results.items():
        ref = runs.get(REFERENCE, {})
        for name, r in runs.items():
            if "error" in r:
                lines.append(f"{case:7} {name:18} FAILED: {r['error'].strip().splitlines()[-1]}")
                continue
            speed = r["tokens_per_s"] / ref["tokens_per_s"] if "tokens_per_s" in ref else None
            mem = r["peak_rss_gb"] / ref["peak_rss_gb"] if "peak_rss_gb" in ref else None
            lines.append(
                f"{case:7} {name:18} {r['tokens_per_s']:9.1f} {fmt(speed, '6.2f')} "
                f"{r['peak_rss_gb']:8.2f} {fmt(mem, '6.2f')} {r['flops_per_token'] / 1e9:9.3f} "
                f"{r['bound_tokens_per_s']:9.1f} {r['of_bound']:8.0%} {r['first_step_s']:7.1f}s "
                f"{r['first_step_overhead_s']:7.1f}s")
    return lines


def check_targets(results: dict) -> list[str]:
    lines = ["", "targets (issue 5):"]

    def say(case, name, what, good):
        lines.append(f"  {case:6} {name:16} {what}: {'met' if good else 'MISSED'}")

    for case, (speed_t, mem_t) in TARGETS.items():
        runs = results.get(case, {})
        ref = runs.get(REFERENCE, {})
        for name in ("minift", "minift compiled"):
            r = runs.get(name, {})
            if "tokens_per_s" not in r or "tokens_per_s" not in ref:
                continue
            if speed_t is not None:
                x = r["tokens_per_s"] / ref["tokens_per_s"]
                say(case, name, f"tokens/s {x:.2f}x ref (>= {speed_t}x)", x >= speed_t)
            if mem_t is not None:
                x = r["peak_rss_gb"] / ref["peak_rss_gb"]
                say(case, name, f"peak RSS {x:.2f}x ref (<= {mem_t}x)", x <= mem_t)
            if case == "lora":
                say(case, name, f"{r['of_bound']:.0%} of the matmul bound (>= {BOUND_TARGET:.0%})",
                    r["of_bound"] >= BOUND_TARGET)
            if name == "minift compiled":
                o = r["first_step_overhead_s"]
                say(case, name, f"compile overhead {o:.1f}s (<= {COMPILE_TARGET_S:.0f}s)",
                    o <= COMPILE_TARGET_S)
                d = abs(r["eval_loss_compiled"] - r["eval_loss_eager"])
                say(case, name, f"|eval loss compiled - eager| {d:.1e} (<= {LOSS_TOL:g})",
                    d <= LOSS_TOL)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {CASES}")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {tuple(RUNS)}")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile included)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--optimizer", choices=("torch-fused", "torch", "minift"),
                    default="torch-fused",
                    help="torch-fused / torch: torch.optim.AdamW(fused=True / False) on "
                         "both sides; minift: minift.AdamW on the minift side, torch's for "
                         "the reference")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every case this many times, interleaved; keep each run's fastest "
                         "tokens/s and its median peak RSS")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 step: a smoke test")
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep inductor's on-disk cache (default: compile cold in a fresh one)")
    ap.add_argument("--matmul-reps", type=int, default=5)
    ap.add_argument("--out", help="write every number to this JSON file")
    # internal: one measurement in a child process
    ap.add_argument("--worker", choices=("matmul", "run"), help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        out = worker_matmul(args) if args.worker == "matmul" else worker_run(args)
        Path(args.result).write_text(json.dumps(out))
        return

    if args.quick:
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 1, 1
    shape = QUICK if args.quick else GPT2_SMALL
    cases = [c for c in args.cases.split(",") if c]
    runs = [r for r in args.runs.split(",") if r]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; choose from {CASES}")
    for r in runs:
        if r not in RUNS:
            ap.error(f"unknown run {r!r}; choose from {tuple(RUNS)}")
    import peft
    import transformers
    meta = dict(device=str(device()), threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, peft=peft.__version__,
                shape=vars(shape), batch=args.batch, seq=args.seq, steps=args.steps,
                warmup=args.warmup, optimizer=args.optimizer, lora=LORA, n_prefix=N_PREFIX,
                lr=LR, weight_decay=WEIGHT_DECAY, load_avg_start=os.getloadavg())
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--seq", str(args.seq), "--optimizer", args.optimizer]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-random"
        save_reference_model(shape, folder)
        meta.update(spawn(["--worker", "matmul", "--matmul-reps", str(args.matmul_reps)]))
        for case, rep, name in ((c, i, n) for c in cases for i in range(args.repeat)
                                for n in runs):
            env = {}
            if RUNS[name][1] and not args.warm_cache:  # a fresh, empty cache: a cold compile
                env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / f"inductor-{case}-{rep}")
            print(f"running {case} / {name} ({rep + 1}/{args.repeat}) ...", file=sys.stderr,
                  flush=True)
            r = spawn(["--worker", "run", "--run", name, "--case", case,
                       "--model-dir", str(folder), *common], env)
            kept = results.setdefault(case, {}).get(name)
            if kept is None or r.get("tokens_per_s", 0) > kept.get("tokens_per_s", 0):
                results[case][name] = kept = {**r, **{k: (kept or {}).get(k, []) for k in (
                    "all_tokens_per_s", "all_peak_rss_gb")}}
            kept["all_tokens_per_s"].append(r.get("tokens_per_s"))
            kept["all_peak_rss_gb"].append(r.get("peak_rss_gb"))
        # the machine's rate, measured again at the end: the best of both (less load noise)
        rate = spawn(["--worker", "matmul", "--matmul-reps", str(args.matmul_reps)])
        meta["matmul_flops_per_s"] = max(meta["matmul_flops_per_s"], rate["matmul_flops_per_s"])
    for case, runs_ in results.items():
        ids, labels = make_batch(shape.vocab_size, args.batch, args.seq, case)
        n_target, n_tokens = int((labels[:, 1:] != -100).sum()), args.batch * args.seq
        for name, r in runs_.items():
            if "error" in r:
                continue
            # peak RSS moves by a few hundred MB between identical runs (how the allocator's
            # heap happens to fragment): the median over the repeats, for every stack
            r["peak_rss_gb"] = statistics.median(x for x in r["all_peak_rss_gb"] if x)
            # the bound counts the work the task needs: the LM head at target tokens only
            r["flops_per_token"] = matmul_flops(shape, case, args.batch, args.seq,
                                                n_target) / n_tokens
            r["bound_tokens_per_s"] = meta["matmul_flops_per_s"] / r["flops_per_token"]
            r["of_bound"] = r["tokens_per_s"] / r["bound_tokens_per_s"]
            head = n_tokens if RUNS[name][0] == "hf" else None  # what the stack computes
            r["flops_per_token_as_run"] = matmul_flops(shape, case, args.batch, args.seq,
                                                       n_target, head) / n_tokens
    meta["load_avg_end"] = os.getloadavg()
    lines = report(results, meta) + check_targets(results)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
