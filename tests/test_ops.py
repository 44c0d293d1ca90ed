"""ops.py, the fast path's pieces, against the plain compositions they replace: a gradcheck
of every autograd Function, and the numbers of plain eager PyTorch (SDPA, nn.Dropout's
distribution, autograd through act(h)); the LM-head loss is tests/test_loss.py."""
import pytest
import torch
import torch.nn.functional as F

from minift import GPTConfig
from minift.model import MLP, CausalSelfAttention, attention_mask_4d
from conftest import reference_keep
from minift.ops import ActLinear, AttentionDropout, Dropout, attention, keep_mask, query_blocks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest
TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64,
            embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


# ------------------------------------------------------------------ attention with dropout
def attention_inputs(dtype, B=2, nh=2, T=6, P=0, hs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T, hs, generator=g, dtype=dtype).requires_grad_()
    k, v = (torch.randn(B, nh, P + T, hs, generator=g, dtype=dtype).requires_grad_()
            for _ in range(2))
    return q, k, v


def square_keep(flat, B, nh, T, S, block):
    """The flat block-ordered keep-mask as one (B, nh, T, S) square (False where not computed)."""
    full = torch.zeros(B, nh, T, S, dtype=torch.bool)
    at = 0
    for i0, i1, n_keys in query_blocks(T, S, block):
        n = B * nh * (i1 - i0) * n_keys
        full[:, :, i0:i1, :n_keys] = flat[at:at + n].view(B, nh, i1 - i0, n_keys).bool()
        at += n
    assert at == flat.numel()
    return full


def plain_attention(q, k, v, mask, keep, p):
    scores = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1))  # a row with no key: zeros
    return (probs * keep / (1 - p)) @ v


def masks(kind, T, P):
    """(mask the op is given or None, the same mask spelled out as (B, 1, T, S))."""
    real = torch.ones(2, P + T, dtype=torch.long)
    causal = attention_mask_4d(real, T)
    if kind == "causal":
        return None, causal
    if kind == "padding":  # row 1 left-padded by 2: its first two queries see no key
        real[1, P:P + 2] = 0
        m = attention_mask_4d(real, T)
        return m, m
    segments = torch.tensor([[0] * 3 + [1] * (T - 3), [0] * (T - 4) + [1] * 4])  # packed rows
    m = attention_mask_4d(real, T, segments)
    return m, m


@pytest.mark.parametrize("block", [None, 2, 4])
@pytest.mark.parametrize("kind,P", [("causal", 0), ("causal", 3), ("padding", 0),
                                    ("padding", 2), ("segments", 0)])
def test_attention_dropout_gradcheck_and_plain_composition(kind, P, block):
    """Every block size (None: one block, as compiled) against the whole square, with the
    causal mask implied (with and without past keys), padding and packed segments."""
    T, p = 7, 0.3
    q, k, v = attention_inputs(torch.float64, T=T, P=P)
    given, mask = masks(kind, T, P)
    blocks = query_blocks(T, P + T, block)
    assert len(blocks) == (1 if block is None else -(-T // block))
    n = sum((i1 - i0) * keys for i0, i1, keys in blocks)
    keep = torch.rand(2 * 2 * n, generator=torch.Generator().manual_seed(1)) >= p
    f = lambda q, k, v: AttentionDropout.apply(q, k, v, given, keep, p, block)
    if block == 2:  # (fast mode: a random projection of the Jacobian; the plain checks below)
        assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)
    full_keep = square_keep(keep, 2, 2, T, P + T, block)
    y, ref = f(q, k, v), plain_attention(q, k, v, mask, full_keep, p)
    assert (y - ref).abs().max() <= 1e-12
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert (a - b).abs().max() <= 1e-12
    # no dropout: SDPA's own numbers (a fully padded row is all zeros in both)
    ones = torch.ones_like(keep)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (AttentionDropout.apply(q, k, v, given, ones, 0.0, block) - sdpa).abs().max() <= 1e-12
    # keep None (bf16 training without dropout): SDPA's numbers and gradients
    y = AttentionDropout.apply(q, k, v, given, None, 0.0, block)
    assert (y - sdpa).abs().max() <= 1e-12
    for a, b in zip(torch.autograd.grad(y, (q, k, v), g), torch.autograd.grad(sdpa, (q, k, v), g)):
        assert (a - b).abs().max() <= 1e-12


def test_query_blocks_cover_the_causal_triangle_only():
    assert query_blocks(5, 5, None) == [(0, 5, 5)] == query_blocks(5, 5, 8)
    assert query_blocks(5, 7, 2) == [(0, 2, 4), (2, 4, 6), (4, 5, 7)]   # P = 2 past keys


def test_attention_without_dropout_is_sdpa():
    q, k, v = attention_inputs(torch.float64, T=5, P=3)
    causal = torch.ones(5, 8, dtype=torch.bool).tril(3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    assert (attention(q, k, v) - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("T", [9, 40])
def test_attention_in_training_keeps_no_square_float_tensor(T, monkeypatch):
    """CausalSelfAttention in training on CPU: output = the plain composition under the mask
    drawn from torch's generator (flat, in block order), and nothing (T, T)-sized in float
    is kept for the backward; with several blocks, the mask covers about half the square."""
    monkeypatch.setattr("minift.ops.QUERY_BLOCK", 16)
    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(**{**TINY, "attn_pdrop": 0.5})).train()
    x = torch.randn(2, T, TINY["n_embd"], requires_grad=True)
    saved = []
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = attn(x)[0]
    assert not [t for t in saved if t.is_floating_point() and t.dim() == 4 and t.shape[-1] == T]
    blocks = query_blocks(T, T, 16)
    n = 2 * 2 * sum((i1 - i0) * keys for i0, i1, keys in blocks)
    assert [t.numel() for t in saved if t.dtype == torch.uint8] == [n]
    assert n < (0.75 if T > 16 else 1.01) * 2 * 2 * T * T
    torch.manual_seed(1)
    keep = square_keep(reference_keep((n,), 0.5), 2, 2, T, T, 16)
    q, k, v = (t.view(2, T, 2, 16).transpose(1, 2) for t in attn.c_attn(x).split(32, dim=2))
    o = plain_attention(q, k, v, torch.ones(T, T, dtype=torch.bool).tril(), keep, 0.5)
    assert (y - attn.c_proj(o.transpose(1, 2).reshape(2, T, 32))).abs().max() <= 1e-6


def test_bf16_training_without_dropout_takes_the_query_blocks():
    """bf16 on the CPU with no dropout: attention() runs AttentionDropout's blocks (no keep
    mask, nothing (T, T)-sized kept), and gives SDPA's output and gradients to bf16 rounding;
    in float32, and without gradients, it stays SDPA."""
    T = 40
    q, k, v = (torch.randn(2, 2, T, 16, generator=torch.Generator().manual_seed(i))
               .to(torch.bfloat16).requires_grad_() for i in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = attention(q, k, v)
    assert y.grad_fn.name() == "AttentionDropoutBackward"
    assert not [t for t in saved if t.dim() == 4 and t.shape[-1] == T and t.shape[-2] == T]
    ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), is_causal=True)
    assert (y.float() - ref).abs().max() <= 0.02
    g = torch.randn(y.shape).to(torch.bfloat16)
    ours = torch.autograd.grad(y, (q, k, v), g)
    theirs = torch.autograd.grad(ref, (q, k, v), g.float())
    for a, b in zip(ours, theirs):
        assert (a.float() - b).abs().max() <= 0.03 * b.abs().max()
    assert attention(q.float(), k.float(), v.float()).grad_fn.name() != "AttentionDropoutBackward"
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(
            q, k, v, is_causal=True), rtol=0, atol=0)


# ------------------------------------------------------------------ dropout masks
@pytest.mark.parametrize("shape, p", [((3, 100_003), 0.3), ((3, 100_003), 0.8), ((2, 5), 0.3),
                                      ((1,), 0.3), ((40_000,), 0.05)])
def test_keep_mask_is_the_geometric_walk(shape, p):
    """The mask of the walk, element by element (conftest.reference_keep), for the drops
    (p <= 1/2) and the keeps (p > 1/2) as the rarer outcome, over several rounds of
    MASK_DRAWS (300K elements at p = 0.3 take three), and handed out as bytes (0/1): what the
    float kernels multiply by fastest."""
    torch.manual_seed(0)
    keep = keep_mask(shape, p, torch.device("cpu"))
    state = torch.get_rng_state()
    torch.manual_seed(0)
    assert keep.dtype == torch.uint8 and keep.shape == shape
    assert torch.equal(keep.view(torch.bool), reference_keep(shape, p))
    assert torch.equal(torch.get_rng_state(), state)   # the same draws consumed


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.7])
def test_keep_mask_drops_with_probability_p(p):
    """Over 4M elements the drops are within 5 standard deviations of p n, and so are the
    pairs of neighbours both dropped (p^2: independent elements, no gap off by one), and the
    drops in the mask's last 10,000 elements (the walk reaches the end); p = 0 keeps all and
    p = 1 drops all."""
    n = 1 << 22
    torch.manual_seed(1)
    dropped = keep_mask((n,), p, torch.device("cpu")) == 0
    for count, m, prob in ((dropped.sum(), n, p), ((dropped[1:] & dropped[:-1]).sum(), n - 1, p * p),
                           (dropped[-10_000:].sum(), 10_000, p)):
        assert abs(count.item() - prob * m) <= 5 * (m * prob * (1 - prob)) ** 0.5, (m, prob)
    assert keep_mask((5, 7), 0.0, torch.device("cpu")).all()
    assert not keep_mask((5, 7), 1.0, torch.device("cpu")).any()
    assert keep_mask((0, 3), 0.1, torch.device("cpu")).shape == (0, 3)


def test_dropout_keeps_a_one_byte_mask_and_scales_the_rest():
    """minift's Dropout on the CPU: zeros with probability p, the rest scaled by 1 / (1 - p),
    the same mask in the backward, and only that mask (one byte an element) kept for it."""
    drop = Dropout(0.25).train()
    assert isinstance(drop, torch.nn.Dropout)  # set_dropout and friends still find it
    x = torch.randn(64, 48, requires_grad=True)
    saved = []
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = drop(x)
    assert [t.dtype for t in saved] == [torch.uint8]
    torch.manual_seed(3)
    keep = reference_keep((64, 48), 0.25)
    assert 0.72 <= keep.float().mean() <= 0.78
    assert torch.equal(y, x * keep * (1 / 0.75))
    g = torch.randn(64, 48)
    y.backward(g)
    assert torch.equal(x.grad, g * keep * (1 / 0.75))
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x


# ------------------------------------------------------------------ the MLP's c_proj
@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu"])
def test_act_linear_gradcheck_and_mlp_equals_plain(activation):
    """The MLP's c_proj(act(h)) keeping only h (full fine-tuning) against autograd's own."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w, b: ActLinear.apply(h, w, b, activation),
                                    (h, w, b))

    torch.manual_seed(0)
    mlp = MLP(GPTConfig(**{**TINY, "activation_function": activation})).train()
    x = torch.randn(2, 5, TINY["n_embd"], requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = mlp(x)
    wide = [t for t in saved if t.dim() == 3 and t.shape[-1] == 4 * TINY["n_embd"]]
    assert len(wide) == 1  # h, not act(h)
    params = (x, mlp.c_fc.weight, mlp.c_proj.weight, mlp.c_proj.bias)
    got = torch.autograd.grad(y.square().sum(), params)
    ref_y = mlp.c_proj(mlp.act(mlp.c_fc(x)))
    ref = torch.autograd.grad(ref_y.square().sum(), params)
    assert torch.equal(y, ref_y)
    for a, c in zip(got, ref):
        assert (a - c).abs().max() <= 1e-6
