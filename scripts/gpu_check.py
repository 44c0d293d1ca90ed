"""The CUDA check: minift's device-agnostic checks on a GPU, one compiled bf16 LoRA step
against eager, and scripts/bench.py on GPT-2 small and medium shapes in bf16 beside
transformers + PEFT. Meant to finish within 8 minutes on one GPU.

    python scripts/gpu_check.py                 # on a CUDA machine: exit 1 on any failure
    python scripts/gpu_check.py --device cpu    # the same checks on the CPU (a dry run of
                                                # this script; bench in --quick mode)

Each check names what it compares and fails loudly (an AssertionError with the numbers):
CUDA-only bugs are dtypes (bf16 autocast reaching the chunked LM-head loss, lazy logits read
outside the forward's autocast), device placement (masks, positions, labels, packed rows
built on the CPU) and autocast with compiled blocks. The references are transformers'
GPT-2 (logits, generation) and plain PyTorch compositions (the full-logits cross-entropy).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=211, n_positions=128)
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def tiny_pair(folder: Path, dev, dropout=0.0):
    """(minift GPT, transformers GPT2LMHeadModel) with the same random weights on `dev`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from minift import GPT
    torch.manual_seed(0)
    cfg = GPT2Config(**TINY, embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(folder)
    return GPT.from_pretrained(folder, device=dev), hf.to(dev)


def batch(dev, B=3, T=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0                                   # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :10] = -100                              # a prompt without loss
    return ids.to(dev), mask.to(dev), labels.to(dev)


def close(a, b, tol, what):
    d = (a.float() - b.float()).abs().max().item()
    assert d <= tol, f"{what}: max |difference| {d:.3g} > {tol:g}"


@check
def logits_loss_and_generation_equal_transformers(dev, tmp):
    ours, hf = tiny_pair(tmp / "pair", dev)
    ids, mask, labels = batch(dev)
    with torch.no_grad():
        out, ref = ours(ids, attention_mask=mask, labels=labels), hf(ids, attention_mask=mask,
                                                                     labels=labels)
        close(out.logits, ref.logits, 1e-4, "lazy logits vs transformers")
        close(out.loss, ref.loss, 1e-4, "loss (target-only head) vs transformers")
        want = hf.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]),
                           max_new_tokens=16, do_sample=False, pad_token_id=0)
        got = ours.generate(ids[:, :8], max_new_tokens=16)
    assert torch.equal(got, want), "greedy generation with the KV cache differs from transformers"


@check
def bf16_autocast_chunked_head_and_lazy_logits(dev, tmp):
    """The chunked loss under autocast: bf16 matmuls, fp32 accumulation, gradients in the
    parameters' dtype and on their device; lazy logits keep the forward's autocast dtype."""
    ours, _ = tiny_pair(tmp / "bf16", dev)
    ours.train()
    ids, mask, labels = batch(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        out = ours(ids, attention_mask=mask, labels=labels)
        eager = ours(ids, attention_mask=mask, labels=labels, return_logits=True)
    assert out.loss.dtype == torch.float32, f"loss dtype {out.loss.dtype}"
    assert out.logits.dtype == eager.logits.dtype == torch.bfloat16, out.logits.dtype
    assert out.logits.device.type == dev.type
    close(out.loss, eager.loss, 2e-2, "bf16: chunked-head loss vs full-logits loss")
    out.loss.backward()
    for n, p in ours.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype == torch.float32, n
        assert p.grad.device == p.device and torch.isfinite(p.grad).all(), n


@check
def packed_rows_equal_padded_batch(dev, tmp):
    from minift.data import collate
    from minift.distributed import to_device
    from minift.packing import collate_packed
    ours, _ = tiny_pair(tmp / "pack", dev)
    ours.train()
    g = torch.Generator().manual_seed(3)
    examples = [{"input_ids": torch.randint(0, 211, (int(n),), generator=g).tolist()}
                for n in torch.randint(3, 40, (10,), generator=g)]
    grads = []
    for make in (collate, collate_packed):
        ours.zero_grad(set_to_none=True)
        loss = ours(**to_device(make(examples, 0), dev)).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in ours.parameters()]))
    close(grads[0][0], grads[1][0], 1e-5, "packed vs padded loss")
    for a, b in zip(grads[0][1], grads[1][1]):
        close(a, b, 1e-5, "packed vs padded gradient")


@check
def train_with_default_bf16_keeps_fp32_state(dev, tmp):
    from minift.config import TrainConfig
    from minift.peft import LoraConfig, get_peft_model
    from minift.train import train
    ours, _ = tiny_pair(tmp / "train", dev, dropout=0.1)
    model = get_peft_model(ours, LoraConfig(r=4, lora_dropout=0.1))
    g = torch.Generator().manual_seed(4)
    data = [{"input_ids": torch.randint(0, 211, (int(n),), generator=g).tolist()}
            for n in torch.randint(5, 60, (16,), generator=g)]
    config = TrainConfig(max_steps=4, batch_size=4, lr=1e-3, packing=True, device=str(dev),
                         log_every=100, eval_every=100)
    result = train(model, data, config=config)
    assert all(torch.isfinite(torch.tensor(result.train_loss))), result.train_loss
    for n, p in model.named_parameters():
        assert p.device.type == dev.type and p.dtype == torch.float32, (n, p.device, p.dtype)


@check
def compiled_bf16_lora_step_equals_eager(dev, tmp):
    from minift.model import compile_blocks
    from minift.peft import LoraConfig, get_peft_model
    models = []
    for compiled in (False, True):
        ours, _ = tiny_pair(tmp / f"compiled{compiled}", dev)
        model = get_peft_model(ours, LoraConfig(r=4, lora_dropout=0.0))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator(dev).manual_seed(5))
        models.append(compile_blocks(model) if compiled else model)
    ids, mask, labels = batch(dev)
    results = []
    for model in models:
        model.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (l_e, g_e), (l_c, g_c) = results
    close(l_e, l_c, 2e-2, "compiled vs eager bf16 loss")
    assert g_e.keys() == g_c.keys() and g_e
    for n in g_e:
        scale = g_e[n].abs().max().item() + 1e-6
        close(g_e[n] / scale, g_c[n] / scale, 5e-2, f"compiled vs eager bf16 gradient {n}")


def run_checks(dev) -> list[str]:
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for fn in CHECKS:
            t0 = time.perf_counter()
            try:
                fn(dev, Path(tmp))
                print(f"ok    {fn.__name__} ({time.perf_counter() - t0:.1f}s)", flush=True)
            except Exception:
                failed.append(fn.__name__)
                print(f"FAIL  {fn.__name__}\n{traceback.format_exc()}", flush=True)
    return failed


def run_bench(quick: bool) -> list[str]:
    """bench.py in bf16 (and fp32 LoRA) on GPT-2 small and medium: its table, and its exit."""
    failed = []
    for shape in ("small", "medium"):
        cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--shape", shape,
               "--rows", "bf16 lora,lora",
               "--steps", "5", "--warmup", "3", "--batch", "8", "--seq", "512"]
        if quick:  # every run the GPU makes, compiled too (a cold compile, ~45 s on 2 cores)
            cmd = cmd[:2] + ["--quick", "--rows", "bf16 lora"]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(proc.stdout[-6000:], flush=True)
        if proc.returncode != 0 or "FAILED" in proc.stdout:
            failed.append(f"bench {shape}")
        if quick:
            break
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    ap.add_argument("--no-bench", action="store_true", help="the checks only, not bench.py")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
                 "--device cpu runs the same checks on the CPU")
    print(f"torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""), flush=True)
    t0 = time.perf_counter()
    failed = run_checks(dev)
    if not args.no_bench:
        failed += run_bench(quick=dev.type != "cuda")
    print(f"\n{len(CHECKS) - len([f for f in failed if f in {c.__name__ for c in CHECKS}])}/"
          f"{len(CHECKS)} checks passed in {time.perf_counter() - t0:.0f}s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
