"""minift/loss.py against the plain full-logits cross-entropy: gradchecks in float64, the
same numbers chunk by chunk and softmax block by block, and the edge cases transformers has."""
import pytest
import torch
import torch.nn.functional as F

from minift import linear
from minift.loss import ChunkedHeadLoss, masked_lm_loss


@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_head_loss_gradcheck(frozen_head):
    """Directional finite differences (torch's gradcheck runs several backwards through one
    graph; this op hands its weight gradient over in place, once)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=not frozen_head)
    y = torch.randint(0, 11, (7,), generator=g)
    inputs = (h,) if frozen_head else (h, w)
    grads = torch.autograd.grad(ChunkedHeadLoss.apply(h, w, y, 3), inputs)
    f = lambda h, w: F.cross_entropy(h @ w.t(), y, reduction="sum")  # only for its values
    for _ in range(3):
        u = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in inputs]
        eps = 1e-6
        plus = [t.detach() + eps * d for t, d in zip(inputs, u)]
        minus = [t.detach() - eps * d for t, d in zip(inputs, u)]
        if frozen_head:
            plus, minus = plus + [w.detach()], minus + [w.detach()]
        with torch.no_grad():
            numeric = (ChunkedHeadLoss.apply(*plus, y, 3) - ChunkedHeadLoss.apply(*minus, y, 3))
        analytic = sum((a * d).sum() for a, d in zip(grads, u))
        assert abs(numeric / (2 * eps) - analytic) <= 1e-7 * max(1.0, abs(analytic))
        assert abs(ChunkedHeadLoss.apply(h, w, y, 3).item() - f(h, w).item()) <= 1e-12


@pytest.mark.parametrize("bf16", [False, True])
def test_head_softmax_blocks_give_the_same_bits(monkeypatch, bf16):
    """SOFTMAX_ROWS only changes how many rows each softmax pass covers: blocks of 3 rows
    (a short last one in every 7-row chunk) and one pass per chunk give the same loss and
    gradients to the bit, in float32 and under bf16 autocast (its fp32 buffer)."""
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(20, 16, generator=g)
    w0 = torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (20,), generator=g)
    results = []
    for rows in (3, 1000):
        monkeypatch.setattr("minift.loss.SOFTMAX_ROWS", rows)
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = ChunkedHeadLoss.apply(h, w, y, 7)
        loss.backward()
        results.append((loss, h.grad, w.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    # and they are the full-logits loss's, under the same autocast (bf16: to its rounding)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ref = F.cross_entropy((h @ w.t()).float(), y, reduction="sum")
    ref.backward()
    tol = 3e-2 if bf16 else 1e-5
    assert abs(results[0][0].item() - ref.item()) <= tol * abs(ref.item())
    for got, want in zip(results[0][1:], (h.grad, w.grad)):
        assert (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("dtype,tol,onednn", [(torch.float64, 1e-12, False),
                                              (torch.float32, 1e-5, False),
                                              (torch.float32, 1e-5, True)])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_masked_chunked_loss_and_gradients_equal_full_logits(dtype, tol, onednn, frozen_head,
                                                             monkeypatch):
    """onednn: the float32 CPU path of GPT-2-sized heads, where both products (the logits
    and d loss / d h) are oneDNN's fresh outputs rather than MKL's into the buffer; these
    shapes are under linear.MIN_MACS, so it is lowered to 0 to send them there."""
    monkeypatch.setattr(linear, "MIN_MACS", 0 if onednn else linear.MIN_MACS)
    torch.manual_seed(0)
    h = torch.randn(3, 10, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 8, dtype=dtype, requires_grad=not frozen_head)
    assert linear.uses_onednn(h, w) == (onednn and linear._HAVE_ONEDNN)
    y = torch.randint(0, 50, (3, 10))
    y[0, :4] = -100          # a masked prompt
    y[2, 7:] = -100          # right padding
    full = F.cross_entropy((h @ w.t())[:, :-1].flatten(0, 1), y[:, 1:].flatten())
    inputs = (h,) if frozen_head else (h, w)
    want = torch.autograd.grad(full, inputs)
    for chunk in (1, 4, 1000):  # chunk boundaries anywhere, and one chunk for all
        got_loss = masked_lm_loss(h, w, y, chunk_size=chunk)
        got = torch.autograd.grad(got_loss, inputs)
        assert abs(got_loss.item() - full.item()) <= tol
        for a, b in zip(got, want):
            assert (a - b).abs().max() <= tol
    with torch.no_grad():  # the evaluation path gives the same number
        assert abs(masked_lm_loss(h, w, y, chunk_size=4).item() - full.item()) <= tol


def test_masked_loss_with_no_targets_is_nan_like_transformers():
    h = torch.randn(1, 4, 8, requires_grad=True)
    assert masked_lm_loss(h, torch.randn(20, 8), torch.full((1, 4), -100)).isnan()


def test_chunked_loss_twice_through_one_graph_is_refused():
    h = torch.randn(2, 6, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    loss = masked_lm_loss(h, w, torch.randint(0, 20, (2, 6)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
