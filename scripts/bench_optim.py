"""Time minift.AdamW against torch.optim.AdamW(foreach=True) on GPT-2-small-shaped
parameters (124M over 148 tensors): python scripts/bench_optim.py [--steps N]."""
import argparse
import time

import torch

from minift.machine import default_device
from minift.optim import AdamW


def gpt2_small_shapes(n_layer=12, d=768, vocab=50257, n_pos=1024):
    shapes = [(vocab, d), (n_pos, d)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),   # ln_1, c_attn, c_proj
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, c_fc, c_proj
    return shapes + [(d,), (d,)]  # ln_f


def time_optimizer(make, shapes, steps, device):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3  # fixed grads: we time the update, not a model
    opt = make([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}])
    opt.step()  # first step allocates the state; keep it out of the timing
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="alternate the two this many times")
    args = ap.parse_args()
    device = default_device()
    shapes = gpt2_small_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"{n / 1e6:.1f}M params in {len(shapes)} tensors on {device}, {args.steps} steps x {args.rounds} rounds")
    mine = lambda g: AdamW(g, lr=1e-4)
    ref = lambda g: torch.optim.AdamW(g, lr=1e-4, foreach=True)
    t_mine, t_ref = [], []
    for _ in range(args.rounds):  # alternate, and keep the best, to damp noise on a shared machine
        t_mine.append(time_optimizer(mine, shapes, args.steps, device))
        t_ref.append(time_optimizer(ref, shapes, args.steps, device))
    a, b = min(t_mine), min(t_ref)
    print(f"minift AdamW        {a * 1e3:8.1f} ms/step")
    print(f"torch AdamW foreach {b * 1e3:8.1f} ms/step")
    print(f"ratio minift/torch  {a / b:8.3f}")


if __name__ == "__main__":
    main()
