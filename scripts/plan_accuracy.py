"""How close minift.plan's estimates come to measurements on tiny models (CPU, seconds).

    python scripts/plan_accuracy.py

For each method, dtype, dropout and length: the activation estimate over the bytes autograd
actually keeps for the backward (saved-tensor hooks; each storage once, parameters left out),
and the FLOP estimate over torch's FlopCounterMode of a real forward + backward. tests/test_plan.py
asserts the same ratios within 20%; this prints them.
"""
import argparse
import random

import torch
from torch.utils.flop_counter import FlopCounterMode

from minift.data import collate
from minift.model import GPTConfig
from minift.plan import MethodOptions, build, estimate

OPTIONS = MethodOptions(r=4, num_virtual_tokens=6, bottleneck_size=8, top_k_blocks=1)
CASES = [(m, "fp32", 0.1, 32) for m in ("full", "partial", "lora", "dora", "adapter", "prefix",
                                         "prompt", "ptuning")]
CASES += [("lora", "bf16", 0.1, 32), ("full", "bf16", 0.1, 32), ("full", "fp32", 0.0, 32),
          ("lora", "fp32", 0.0, 32), ("prefix", "fp32", 0.0, 32), ("full", "fp32", 0.1, 300),
          ("lora", "fp32", 0.1, 300), ("prefix", "fp32", 0.1, 300)]


def saved_bytes(model, batch) -> tuple[int, torch.Tensor]:
    """Bytes of the tensors autograd keeps for the backward (each storage once, parameters
    left out), and the loss. tests/test_plan.py measures with this too."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, return_logits=False).loss
    return sum(seen.values()), loss


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help; no options
    torch.set_num_threads(1)
    print(f"{'method':8s} {'dtype':5s} {'dropout':>7s} {'T':>4s}  {'activations est/measured':>24s}"
          f"  {'FLOPs est/counted':>17s}")
    for method, dtype, dropout, T in CASES:
        c = GPTConfig(n_layer=3, n_head=4, n_embd=64, vocab_size=200, n_positions=T + 8,
                      embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
        torch.manual_seed(0)
        model = build(c, method, OPTIONS, device="cpu").train()
        rng = random.Random(0)
        examples = [{"input_ids": [rng.randrange(200) for _ in range(rng.randrange(T - 4, T + 1))]}
                    for _ in range(4)]
        for ex in examples:
            ex["labels"] = list(ex["input_ids"])
        batch = collate(examples, 0, T)
        length = batch["input_ids"].shape[1]
        e = estimate("tiny", method, 4, length, dtype=dtype, options=OPTIONS, config=c,
                     memory=1 << 40)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"), \
                FlopCounterMode(display=False) as flops:
            measured, loss = saved_bytes(model, batch)
            loss.backward()
        virtual = OPTIONS.num_virtual_tokens if method in ("prompt", "ptuning") else 0
        tokens = 4 * (length + virtual)
        print(f"{method:8s} {dtype:5s} {dropout:7.1f} {length:4d}  "
              f"{e.activation_bytes / measured:24.3f}"
              f"  {e.flops_per_token * tokens / flops.get_total_flops():17.3f}")


if __name__ == "__main__":
    main()
