"""minift/linear.py: float32 products on the CPU through oneDNN, equal to F.linear's within
float32's rounding, with autograd's gradients, and torch's own products wherever oneDNN
does not apply (autocast, torch.func, compiled code, other dtypes, GEMM = "mkl")."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import minift.linear as linear
from minift import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch has no oneDNN")


MIN_MACS = linear.MIN_MACS


@pytest.fixture(autouse=True)
def every_size(monkeypatch):
    """oneDNN for every product size, so that these tests' small shapes exercise it (minift
    leaves products under linear.MIN_MACS to MKL: test_small_products_stay_with_mkl)."""
    monkeypatch.setattr(linear, "MIN_MACS", 0)


def test_small_products_stay_with_mkl(monkeypatch):
    """Under MIN_MACS multiply-adds (rows x out x in) MKL's product, where oneDNN's fixed cost
    per call loses; from it oneDNN. Either way round (x W^T and g W); MKL's numbers exactly."""
    monkeypatch.setattr(linear, "MIN_MACS", MIN_MACS)
    w = torch.randn(768, 256)                                # minift-tiny's c_attn: 196,608
    rows = -(-MIN_MACS // w.numel())                         # 6 rows: the first at MIN_MACS
    assert not linear.uses_onednn(torch.randn(rows - 1, 256), w)
    assert linear.uses_onednn(torch.randn(rows, 256), w)
    assert not linear.uses_onednn(torch.randn(1, rows - 1, 768), w)   # g W, g (..., out)
    assert linear.uses_onednn(torch.randn(2, 3, 768), w)
    assert linear.uses_onednn(torch.randn(1, 256), torch.randn(4096, 256))  # the head: 1M
    x = torch.randn(rows - 1, 256)
    assert torch.equal(linear.linear(x, w), F.linear(x, w))  # MKL's, exactly


@pytest.fixture
def gemm():
    """Restore linear.GEMM after a test that sets it."""
    saved = linear.GEMM
    yield
    linear.GEMM = saved


def rel_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    return ((a.double() - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("rows,out,inp", [(64, 96, 48), (7, 2304, 768), (1, 300, 768),
                                          (1024, 3072, 768)])
def test_products_are_float32_products_of_the_same_accuracy_as_torch(rows, out, inp):
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, inp), torch.randn(out, inp), torch.randn(out)
    g = torch.randn(rows, out)
    assert linear.uses_onednn(x, w) and linear.uses_onednn(g.t(), x.t())
    fwd64 = x.double() @ w.double().t() + b.double()
    bwd64 = g.double() @ w.double()
    dw64 = g.double().t() @ x.double()
    y, dx, dw = linear.matmul_t(x, w, b), linear.matmul(g, w), linear.matmul_tn(g, x)
    assert y.dtype == dx.dtype == dw.dtype == torch.float32
    assert y.shape == (rows, out) and dx.shape == (rows, inp) and dw.shape == (out, inp)
    # within float32's rounding of the exact product, as torch's own (MKL's) is: measured,
    # both 1.5e-7 to 1.1e-6 of the largest entry, oneDNN's up to 3.4x MKL's
    for ours, theirs, exact in ((y, F.linear(x, w, b), fwd64), (dx, g @ w, bwd64),
                                (dw, g.t() @ x, dw64)):
        assert rel_err(ours, exact) <= min(2e-6, 5 * rel_err(theirs, exact) + 2e-7)


def test_three_dimensional_and_strided_inputs_keep_their_shape():
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    x3 = torch.randn(2, 5, 24)
    strided = torch.randn(24, 9).t()                        # (9, 24), not contiguous
    torch.testing.assert_close(linear.matmul_t(x3, w), x3 @ w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.matmul_t(strided, w), strided @ w.t(), rtol=1e-5, atol=1e-5)
    g3 = torch.randn(2, 5, 40)
    assert linear.matmul(g3, w).shape == (2, 5, 24)
    torch.testing.assert_close(linear.matmul(g3, w), g3 @ w, rtol=1e-5, atol=1e-5)
    # the weight gradient sums over every leading dimension: (40, 24)
    dw = g3.reshape(10, 40).t() @ x3.reshape(10, 24)
    torch.testing.assert_close(linear.matmul_tn(g3, x3), dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("need", ["x", "w", "b", "xwb"])
def test_linear_gradients_equal_autograds_through_f_linear(need):
    torch.manual_seed(0)
    leaves = dict(x=torch.randn(3, 6, 32), w=torch.randn(48, 32), b=torch.randn(48))
    ours = {k: v.clone().requires_grad_(k in need) for k, v in leaves.items()}
    ref = {k: v.clone().requires_grad_(k in need) for k, v in leaves.items()}
    up = torch.randn(3, 6, 48)
    (linear.linear(ours["x"], ours["w"], ours["b"]) * up).sum().backward()
    (F.linear(ref["x"], ref["w"], ref["b"]) * up).sum().backward()
    for k in leaves:
        if k in need:
            torch.testing.assert_close(ours[k].grad, ref[k].grad, rtol=1e-5, atol=1e-5)
        else:
            assert ours[k].grad is None


def test_gemm_mkl_and_every_other_case_is_torchs_own_product(gemm):
    torch.manual_seed(0)
    x, w, b = torch.randn(16, 32), torch.randn(64, 32), torch.randn(64)
    exact = F.linear(x, w, b)
    linear.GEMM = "mkl"
    assert not linear.uses_onednn(x, w) and torch.equal(linear.linear(x, w, b), exact)
    linear.GEMM = "MKL"                                     # neither name: one clear error
    with pytest.raises(ValueError, match="minift.linear.GEMM must be 'onednn' or 'mkl', got 'MKL'"):
        linear.linear(x, w, b)
    linear.GEMM = "onednn"
    assert not linear.uses_onednn(x.double(), w.double())
    assert not linear.uses_onednn(x[:0], w)
    assert linear.linear(x[:0], w, b).shape == (0, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):       # autocast casts, as for F.linear
        assert not linear.uses_onednn(x, w)
        assert linear.linear(x, w, b).dtype == torch.bfloat16
    # torch.func: the op has no batching rule, so the transforms get F.linear
    per_row = torch.func.vmap(lambda r: linear.linear(r, w, b))(x)
    assert torch.equal(per_row, torch.func.vmap(lambda r: F.linear(r, w, b))(x))
    grad_w = torch.func.grad(lambda w_: linear.linear(x, w_, b).square().sum())(w)
    torch.testing.assert_close(grad_w, torch.func.grad(lambda w_: F.linear(x, w_, b).square().sum())(w))


def test_the_models_projections_are_minift_linears_with_nn_linears_names():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=8))
    block = model.transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj,
                  model.lm_head):
        assert type(layer) is linear.Linear and isinstance(layer, nn.Linear)
    assert "transformer.h.0.attn.c_attn.weight" in model.state_dict()


def test_a_training_step_is_the_same_with_either_kernel_to_float32s_rounding(gemm):
    """A model's loss and gradients with oneDNN's products against MKL's: the same numbers
    up to the summation order (dropout off, so both see the same function)."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=300, n_positions=32,
                       embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    model = GPT(config).train()
    ids = torch.randint(0, 300, (3, 32))
    grads = {}
    for g in ("mkl", "onednn"):
        linear.GEMM = g
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads[g] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["onednn"][0], grads["mkl"][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads["onednn"][1], grads["mkl"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_flop_counter_counts_onednns_products_as_torchs(gemm):
    from torch.utils.flop_counter import FlopCounterMode
    x, w = torch.randn(2, 5, 24, requires_grad=True), torch.randn(40, 24, requires_grad=True)
    counts = {}
    for g in ("mkl", "onednn"):
        linear.GEMM = g
        with FlopCounterMode(display=False) as counter:
            linear.linear(x, w).sum().backward()
        counts[g] = counter.get_total_flops()
    assert counts["onednn"] == counts["mkl"] == 3 * 2 * 10 * 24 * 40   # forward, dx, dw
