"""The fast path: compiled blocks (and later the fused LoRA op) against plain eager PyTorch.

Correctness only; timings live in scripts/bench.py. Compiling costs ~10-20 s per graph on
a small CPU, so the compiled checks share one module-scoped compiled model.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from minift import GPT, GPTConfig
from minift.model import Block, compile_blocks

# Dropout off: inductor draws its own random numbers, so only a dropout-free step can be
# compared number for number with eager.
TINY = dict(n_layer=3, n_head=2, n_embd=32, vocab_size=97, n_positions=64,
            embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels, return_logits=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def assert_close_grads(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= tol, name


def batch(T, seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 3] = -100  # a prompt carrying no loss
    return ids, labels


@pytest.fixture(scope="module")
def eager_and_compiled():
    torch.manual_seed(0)
    eager = GPT(GPTConfig(**TINY)).train()
    compiled = GPT(GPTConfig(**TINY)).train()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()  # start from empty caches so the counts below are ours
    counters.clear()
    return eager, compile_blocks(compiled)


def test_explain_block_has_no_graph_break():
    block = Block(GPTConfig(**TINY)).train()
    x = torch.randn(2, 7, TINY["n_embd"], requires_grad=True)
    out = torch._dynamo.explain(block)(x)
    assert out.graph_break_count == 0 and out.graph_count == 1, out.break_reasons


def test_compiled_step_equals_eager_and_new_length_does_not_recompile(eager_and_compiled):
    eager, compiled = eager_and_compiled
    for T in (16, 23, 40):  # the first length compiles; the others must reuse that graph
        ids, labels = batch(T, seed=T)
        l_e, g_e = loss_and_grads(eager, ids, labels)
        l_c, g_c = loss_and_grads(compiled, ids, labels)
        assert abs(l_e - l_c) <= 1e-5
        assert_close_grads(g_e, g_c)
    # one frame compiled for all n_layer blocks and all three lengths
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["frames"]["total"] == 1, dict(counters["frames"])


def test_compiled_with_checkpointing_equals_eager(eager_and_compiled):
    eager, compiled = eager_and_compiled
    ids, labels = batch(20, seed=5)
    l_e, g_e = loss_and_grads(eager, ids, labels)
    compiled.gradient_checkpointing = True
    try:
        l_c, g_c = loss_and_grads(compiled, ids, labels)
    finally:
        compiled.gradient_checkpointing = False
    assert abs(l_e - l_c) <= 1e-5
    assert_close_grads(g_e, g_c)


def test_compile_blocks_needs_blocks():
    with pytest.raises(ValueError, match="no transformer Block"):
        compile_blocks(torch.nn.Linear(2, 2))
