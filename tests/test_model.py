"""GPT against transformers' GPT2LMHeadModel: logits, loss, masks, generation."""
import pytest
import torch
from conftest import make_hf_gpt2

from minift import GPT, GPTConfig
from minift.generation import filter_logits

CONFIGS = [
    dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64),
    dict(n_layer=3, n_head=4, n_embd=48, vocab_size=131, n_positions=40, n_inner=80),
    dict(n_layer=1, n_head=1, n_embd=16, vocab_size=50, n_positions=32, layer_norm_epsilon=1e-6),
]


@pytest.fixture(scope="module", params=range(len(CONFIGS)), ids=lambda i: f"cfg{i}")
def pair(request, tmp_path_factory):
    """(minift model, transformers model) with the same random weights, both in eval mode."""
    folder = tmp_path_factory.mktemp(f"cfg{request.param}")
    hf = make_hf_gpt2(folder, seed=request.param, **CONFIGS[request.param])
    return GPT.from_pretrained(folder), hf


def padded_batch(vocab, side):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12))
    mask = torch.ones_like(ids)
    lengths = [12, 7, 4]
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, : 12 - n] = 0
        else:
            mask[row, n:] = 0
    return ids, mask


@torch.no_grad()
def test_logits_equal_transformers(pair):
    ours, hf = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 17))
    assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padding_masks_equal_transformers(pair, side):
    ours, hf = pair
    ids, mask = padded_batch(ours.config.vocab_size, side)
    a = ours(ids, attention_mask=mask).logits
    b = hf(ids, attention_mask=mask).logits
    real = mask.bool()  # padding rows are meaningless in both; compare every real position
    assert (a - b)[real].abs().max() <= 1e-5
    assert (a - b).abs().max() <= 1e-5  # and in fact they agree everywhere


@torch.no_grad()
def test_loss_equals_transformers_with_ignored_labels(pair):
    ours, hf = pair
    ids, mask = padded_batch(ours.config.vocab_size, "right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt whose tokens carry no loss
    ref = hf(ids, attention_mask=mask, labels=labels).loss
    assert abs(ours(ids, attention_mask=mask, labels=labels).loss - ref) <= 1e-5
    # the logits-free path computes the same loss from the target positions only
    out = ours(ids, attention_mask=mask, labels=labels, return_logits=False)
    assert out.logits is None and abs(out.loss - ref) <= 1e-5


def test_inputs_embeds_equal_input_ids(pair):
    ours, _ = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        a = ours(ids).logits
        b = ours(inputs_embeds=ours.transformer.wte(ids)).logits
    assert torch.equal(a, b)


@torch.no_grad()
def test_kv_cache_equals_full_forward(pair):
    ours, _ = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 10))
    full = ours(ids).logits
    out = ours(ids[:, :6], use_cache=True)
    step = ours(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True)
    assert (step.logits - full[:, 6:]).abs().max() <= 1e-5
    assert step.past_key_values[0][0].shape == (2, ours.config.n_head, 10, ours.config.n_embd // ours.config.n_head)


@torch.no_grad()
def test_greedy_generation_equals_transformers(pair):
    ours, hf = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 5))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                      do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=24), ref)


@torch.no_grad()
def test_left_padded_batch_generation_equals_transformers(pair):
    ours, hf = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left")
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(got, ref)
    # a left-padded row generates what it would alone, unpadded
    alone = ours.generate(ids[2:3, -4:], max_new_tokens=20)
    assert torch.equal(got[2, -20:], alone[0, -20:])


@torch.no_grad()
def test_cache_and_no_cache_generate_the_same(pair):
    ours, _ = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left")
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=20, use_cache=True)
    b = ours.generate(ids, attention_mask=mask, max_new_tokens=20, use_cache=False)
    assert torch.equal(a, b)
    s1 = ours.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=True, top_k=10, seed=3)
    s2 = ours.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=True, top_k=10,
                       seed=3, use_cache=False)
    assert torch.equal(s1, s2)


@torch.no_grad()
def test_seeded_sampling_is_reproducible():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=64)).eval()
    ids = torch.zeros(3, 2, dtype=torch.long)
    kw = dict(max_new_tokens=30, do_sample=True, temperature=1.5, top_p=0.9)
    a = model.generate(ids, seed=7, **kw)
    assert torch.equal(a, model.generate(ids, seed=7, **kw))
    assert not torch.equal(a, model.generate(ids, seed=8, **kw))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(a, model.generate(ids, generator=g, **kw))


@torch.no_grad()
def test_eos_stops_and_pads_finished_rows():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=20, n_positions=64)).eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = model.generate(ids, max_new_tokens=12)
    eos = int(free[0, 4])  # the token row 0 emits second: make it the end of text
    out = model.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=19)
    row0 = out[0, 3:].tolist()
    stop = row0.index(eos)
    assert stop <= 1 and all(t == 19 for t in row0[stop + 1:])
    if eos not in out[1, 3:].tolist():  # a row still running keeps the batch going to the limit
        assert out.shape[1] == 3 + 12


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = filter_logits(logits, top_p=0.8).isfinite()  # 0.5 + 0.2 < 0.8, + 0.15 reaches it
    assert kept.tolist() == [[True, True, True, False, False]]
    kept = filter_logits(logits, top_p=0.01).isfinite()  # always at least the top token
    assert kept.tolist() == [[True, False, False, False, False]]
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=0)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 1, None), (1.0, 5, None), (1.0, 50, None), (1.0, 64, None), (1.0, None, 0.0),
    (1.0, None, 0.1), (1.0, None, 0.5), (1.0, None, 0.9), (1.0, None, 1.0), (0.7, 10, 0.8),
    (1.3, 0, 0.6)])
def test_filter_logits_equals_transformers_warpers(temperature, top_k, top_p):
    """The tokens kept for sampling are those of transformers' warpers, in generate's order
    (temperature, top-k, top-p); top_k=0 is generate's "no top-k warper"."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theirs = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p is not None:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    ours = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    assert torch.allclose(ours[ours.isfinite()], theirs[theirs.isfinite()], rtol=0, atol=1e-12)


def test_input_longer_than_context_is_refused():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=10, n_positions=16))
    with pytest.raises(ValueError, match="n_positions=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="n_positions=16"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=10)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="activation_function"):
        GPTConfig(activation_function="swish")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="exactly one"):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=10, n_positions=8))()


def test_lm_head_is_tied_and_gradients_flow():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=30, n_positions=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 30, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_checkpointing_gives_equal_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=30, n_positions=16,
                          embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
    ids = torch.randint(0, 30, (2, 8))
    calls = []   # every block forward, the recomputations in backward included
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # (the recompute stops early:
        # torch's checkpoint ends it once the saved tensors are back, so a post-hook misses it)
    model(ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    assert len(calls) == 2
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2 + 4   # each block ran again in backward
    for a, p in zip(plain, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-7)


# ------------------------------------------------------------------ lazy logits
def test_lazy_logits_equal_transformers_and_eager(pair):
    """With labels, the loss comes from the target-only head and out.logits is computed
    when read: transformers' logits, and the same tensor return_logits=True gives."""
    ours, hf = pair
    ids, mask = padded_batch(ours.config.vocab_size, "right")
    labels = ids.masked_fill(mask == 0, -100)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        out = ours(**{"input_ids": ids, "attention_mask": mask, "labels": labels})
        assert "not computed" in repr(out)
        eager = ours(ids, attention_mask=mask, labels=labels, return_logits=True)
    assert abs(out.loss - ref.loss) <= 1e-5 and abs(eager.loss - ref.loss) <= 1e-5
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    assert torch.equal(out.logits, eager.logits) and out.logits is out.logits  # computed once
    assert not out.logits.requires_grad  # the forward's no_grad holds when read later


def hf_grads(hf):
    """transformers' gradients under minift's names and (out, in) layout."""
    from minift.checkpoint import TRANSPOSED
    out = {}
    for name, p in hf.named_parameters():
        if p.grad is not None and name != "lm_head.weight":
            out[name] = p.grad.t() if name.endswith(TRANSPOSED) else p.grad
    return out


@pytest.mark.parametrize("loop", ["guides", "accumulation"])
def test_plain_loops_give_transformers_gradients(hf_tiny, loop):
    """The guides' loop (`model(**batch).loss.backward()`) and the classic accumulation
    loop (loss / n_micro per micro-batch) give transformers' gradients, in train mode with
    dropout off, reading the logits in one micro-batch (lazy, differentiable) too."""
    folder, _ = hf_tiny
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(folder, embd_pdrop=0.0, attn_pdrop=0.0,
                                         resid_pdrop=0.0).train()
    ours = GPT.from_pretrained(folder)
    for m in ours.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ours.attn_pdrop = 0.0
    for block in ours.transformer.h:
        block.attn.attn_pdrop = 0.0
    ours.train()
    torch.manual_seed(0)
    ids, mask = padded_batch(ours.config.vocab_size, "right")
    labels = ids.masked_fill(mask == 0, -100)
    micro = [slice(0, 3)] if loop == "guides" else [slice(0, 1), slice(1, 3)]
    for model in (ours, hf):
        for j, s in enumerate(micro):
            out = model(input_ids=ids[s], attention_mask=mask[s], labels=labels[s])
            loss = out.loss / len(micro)
            if j == 0:  # the logits, read before the backward, carry a gradient too
                loss = loss + 1e-3 * out.logits.float().square().mean()
            loss.backward()
    want = hf_grads(hf)
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert got.keys() == want.keys()
    for name in got:
        assert (got[name] - want[name]).abs().max() <= 1e-5, name


def test_lazy_logits_keep_the_forwards_autocast_and_the_edge_after_backward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=30, n_positions=16,
                          embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
    ids = torch.randint(0, 30, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
        eager = model(ids, labels=ids, return_logits=True)
    assert out.logits.dtype == eager.logits.dtype == torch.bfloat16  # read outside autocast
    assert torch.equal(out.logits, eager.logits)
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert calls == []  # the loss alone never ran the full LM head
    late = out.logits  # first read after the backward: right values, graph below freed
    assert torch.equal(late, model(ids, return_logits=True).logits)
    with pytest.raises(RuntimeError, match="second time"):
        late.sum().backward()
    assert model(ids, labels=ids, return_logits=False).logits is None
