import copy
import io
import warnings

import pytest
import torch
from torch import nn

from minift.optim import (AdamW, build_param_groups, get_constant_schedule_with_warmup,
                          get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def two_groups(net):
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "lr": 1e-2, "weight_decay": 0.1},
            {"params": biases, "lr": 3e-3, "weight_decay": 0.01}]


def train(net, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def test_matches_torch_adamw_over_200_steps():
    a, b = small_net(), small_net()
    train(a, AdamW(two_groups(a), betas=(0.9, 0.95), eps=1e-8), 200)
    train(b, torch.optim.AdamW(two_groups(b), betas=(0.9, 0.95), eps=1e-8, foreach=True), 200)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{name}: max diff {(pa - pb).abs().max().item()}"  # bit-for-bit


def test_no_bias_correction_matches_hand_written_update():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3))
    ref = p.detach().clone()
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.9, 1e-6, 0.05
    opt = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, correct_bias=False)
    m, v = torch.zeros_like(ref), torch.zeros_like(ref)
    for _ in range(5):
        g = torch.randn(5, 3)
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        ref = ref - lr * m / (v.sqrt() + eps)
        torch.testing.assert_close(p.detach(), ref, rtol=1e-6, atol=1e-7)


def test_skips_params_without_grad():
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = AdamW([used, unused], lr=0.1, weight_decay=0.1)
    used.grad = torch.ones(3)
    opt.step()
    assert torch.equal(unused, torch.ones(3)) and unused not in opt.state
    assert opt.state[used]["step"] == 1


def test_state_dict_round_trip_continues_identically():
    ref = small_net()
    train(ref, AdamW(two_groups(ref)), 20)  # uninterrupted: 20 steps on one data stream

    net = small_net()
    opt = AdamW(two_groups(net))
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):  # first half, then save everything to bytes
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    gen_state = gen.get_state()
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    fresh = small_net()
    fresh.load_state_dict(ckpt["model"])
    opt2 = AdamW(two_groups(fresh))
    opt2.load_state_dict(ckpt["opt"])
    gen.set_state(gen_state)
    for _ in range(10):
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
        opt2.zero_grad()
        nn.functional.mse_loss(fresh(x), y).backward()
        opt2.step()
    for pa, pb in zip(fresh.parameters(), ref.parameters()):
        assert torch.equal(pa, pb)
    assert all(s["step"] == 20 for s in opt2.state.values())


def test_loads_torch_adamw_state():
    # torch keeps `step` as a tensor; minift accepts it, so a torch run can be resumed here
    a, b = small_net(), small_net()
    ta, tb = torch.optim.AdamW(two_groups(a)), torch.optim.AdamW(two_groups(b))
    train(a, ta, 5), train(b, tb, 5)
    mb = AdamW(two_groups(b))
    mb.load_state_dict(tb.state_dict())
    train(a, ta, 5, seed=2), train(b, mb, 5, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.999)}, "betas"), ({"betas": (0.9, -0.1)}, "betas"),
    ({"eps": -1e-8}, "eps"), ({"weight_decay": -0.1}, "weight_decay")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW([nn.Parameter(torch.ones(1))], **kwargs)
    with pytest.raises(ValueError, match=match):  # per-group values are checked too
        AdamW([{"params": [nn.Parameter(torch.ones(1))], **kwargs}])


def test_sparse_grad_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamW(emb.parameters()).step()


# ---- schedules: equal to transformers' functions of the same name at every step ----

def lrs(make, steps):
    opt = AdamW([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched, out = make(opt), []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


COMBOS = [(0, 10), (3, 10), (5, 5), (10, 40), (7, 3)]


@pytest.mark.parametrize("warmup, total", COMBOS)
def test_schedules_match_transformers(warmup, total):
    hf = pytest.importorskip("transformers.optimization")
    n = total + 5  # run past the end: the lr must stay clamped at 0
    assert lrs(lambda o: get_linear_schedule_with_warmup(o, warmup, total), n) == \
        lrs(lambda o: hf.get_linear_schedule_with_warmup(o, warmup, total), n)
    assert lrs(lambda o: get_constant_schedule_with_warmup(o, warmup), n) == \
        lrs(lambda o: hf.get_constant_schedule_with_warmup(o, warmup), n)
    for cycles in (0.5, 1.0, 2.3):
        assert lrs(lambda o: get_cosine_schedule_with_warmup(o, warmup, total, cycles), n) == \
            lrs(lambda o: hf.get_cosine_schedule_with_warmup(o, warmup, total, cycles), n)


def test_scheduler_state_round_trip():
    def make():
        opt = AdamW([nn.Parameter(torch.zeros(1))], lr=0.5)
        return opt, get_cosine_schedule_with_warmup(opt, 4, 20, num_cycles=1.5)
    opt, sched = make()
    for _ in range(7):
        opt.step(), sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    opt2, sched2 = make()
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.last_epoch == 7
    for _ in range(10):
        assert sched2.get_last_lr() == sched.get_last_lr()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        opt.step(), sched.step(), opt2.step(), sched2.step()


# ---- parameter groups, on a stand-in with GPT-2's module names ----

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


def tiny_gpt(n_layer=3, d=8, vocab=20):
    m = nn.Module()
    m.transformer = nn.Module()
    m.transformer.wte, m.transformer.wpe = nn.Embedding(vocab, d), nn.Embedding(16, d)
    m.transformer.h = nn.ModuleList(Block(d) for _ in range(n_layer))
    m.transformer.ln_f = nn.LayerNorm(d)
    m.lm_head = nn.Linear(d, vocab, bias=False)
    m.lm_head.weight = m.transformer.wte.weight  # tied, as in GPT-2
    return m


def names_by_group(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [name_of[id(p)] for p in g["params"]] for g in groups}


def test_param_groups_decay_split():
    m = tiny_gpt()
    m.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)  # frozen: left out
    groups = build_param_groups(m, weight_decay=0.1, lr=3e-4)
    by = names_by_group(m, groups)
    assert set(by) == {"decay", "no_decay"}
    assert all(n.endswith("bias") or ".ln_" in n or ".wte." in n or ".wpe." in n for n in by["no_decay"])
    assert all(n.endswith("weight") and ".ln_" not in n for n in by["decay"])
    assert "transformer.wte.weight" in by["no_decay"]
    everything = by["decay"] + by["no_decay"]
    assert len(everything) == len(set(everything))  # tied lm_head.weight appears once
    assert "transformer.h.0.mlp.c_fc.weight" not in everything
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert sorted(everything) == sorted(trainable)
    wd = {g["name"]: g["weight_decay"] for g in groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0} and all(g["lr"] == 3e-4 for g in groups)


def test_layer_decay_lrs():
    m, n_layer, base, decay = tiny_gpt(n_layer=3), 3, 1e-3, 0.7
    c_attn = m.transformer.h[1].attn.c_attn
    c_attn.register_parameter("lora_A", nn.Parameter(torch.zeros(2, 8)))  # adapter in block 1
    m.prompt_embeddings = nn.Parameter(torch.zeros(4, 8))  # prompt outside the blocks: top
    groups = build_param_groups(m, weight_decay=0.1, lr=base, layer_decay=decay)
    name_of = {id(p): n for n, p in m.named_parameters()}

    def depth(n):
        if n.startswith("transformer.h."):
            return n_layer - int(n.split(".")[2])
        return n_layer + 1 if n.startswith(("transformer.wte", "transformer.wpe")) else 0

    seen = []
    for g in groups:
        for p in g["params"]:
            n = name_of[id(p)]
            assert g["lr"] == base * decay ** depth(n), (n, g["name"])
            assert g["name"].startswith(f"depth{depth(n)}_")
            seen.append(n)
    assert sorted(seen) == sorted(name_of.values())
    assert any(g["name"] == "depth2_decay" and any(p is c_attn.lora_A for p in g["params"]) for g in groups)
    # a LambdaLR schedule scales every group's own lr by the same factor
    opt = AdamW(groups)
    sched = get_linear_schedule_with_warmup(opt, 2, 10)
    opt.step(), sched.step()
    assert all(g["lr"] == 0.5 * g["initial_lr"] for g in opt.param_groups)
    with pytest.raises(ValueError, match="lr"):
        build_param_groups(m, 0.1, layer_decay=0.9)


def test_param_groups_on_real_gpt():
    try:
        from minift.model import GPT, GPTConfig
    except ImportError:
        pytest.skip("minift.model not available yet")
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    by = names_by_group(m, build_param_groups(m, 0.1, lr=1e-3, layer_decay=0.8))
    no_decay = [n for k, v in by.items() if k.endswith("no_decay") for n in v]
    assert all(n.endswith("bias") or ".ln_" in n or ".wte." in n or ".wpe." in n for n in no_decay)
    everything = [n for v in by.values() for n in v]
    assert len(everything) == len(set(everything)) == len(list(m.parameters()))
    assert "transformer.wte.weight" in by["depth3_no_decay"]
    assert "transformer.h.0.attn.c_attn.weight" in by["depth2_decay"]
    assert "transformer.ln_f.weight" in by["depth0_no_decay"]


def test_loraplus_groups_and_lrs_after_scheduling_match_peft():
    """LoRA+ (Hayou et al. 2024): every lora_B at lr * ratio in groups of its own, decay rules
    unchanged; each parameter's lr after warmup steps equals PEFT's create_loraplus_optimizer
    under transformers' schedule on torch.optim.AdamW."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer
    from transformers import get_linear_schedule_with_warmup as hf_linear

    from minift.model import GPT, GPTConfig
    from minift.peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50,
                                         n_positions=32)),
                           LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    lr, ratio = 1e-3, 16.0
    groups = build_param_groups(model, weight_decay=0.1, lr=lr, loraplus_lr_ratio=ratio)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        is_b = [".lora_B." in names[id(p)] for p in g["params"]]
        assert all(is_b) == g["name"].endswith("_lora_B") and len(set(is_b)) == 1
        assert g["lr"] == (lr * ratio if all(is_b) else lr)
        assert g["weight_decay"] == 0.1          # A and B are matrices: both decay
    assert sum(len(g["params"]) for g in groups) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr,
                                           loraplus_lr_ratio=ratio)
    ours = AdamW(groups)
    s_ours, s_theirs = get_linear_schedule_with_warmup(ours, 3, 10), hf_linear(theirs, 3, 10)
    for _ in range(4):
        ours.step(), theirs.step(), s_ours.step(), s_theirs.step()
        mine = {id(p): g["lr"] for g in ours.param_groups for p in g["params"]}
        other = {id(p): g["lr"] for g in theirs.param_groups for p in g["params"]}
        assert mine == other and len(set(mine.values())) == 2
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        build_param_groups(model, 0.1, lr=lr, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="need the base lr"):
        build_param_groups(model, 0.1, loraplus_lr_ratio=4)


def test_train_gives_lora_b_its_loraplus_lr():
    """train(loraplus_lr_ratio=4): the lora_B groups run at 4x the schedule's lr every step
    (the callback's lr is the top group's); without the option every group has the base lr."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import cfg, pattern_data, tiny_model

    from minift.peft import LoraConfig, get_peft_model
    from minift.train import make_optimizer, train
    data = pattern_data(8)
    for ratio, factor in ((None, 1.0), (4.0, 4.0)):   # (ignoring the ratio fails the 2nd)
        model = get_peft_model(tiny_model(0), LoraConfig(r=2))
        seen = []
        config = cfg(lr=1e-3, max_steps=4, warmup_steps=2, loraplus_lr_ratio=ratio)
        train(model, data, None, config, callback=seen.append)
        schedule = [0.0, 0.5, 1.0, 0.5]        # linear warmup over 2 steps, then down to 0 at 4
        assert [r["lr"] for r in seen] == pytest.approx([1e-3 * factor * m for m in schedule])
        optimizer, _ = make_optimizer(model, config, 4)
        names = {id(p): n for n, p in model.named_parameters()}
        for g in optimizer.param_groups:
            is_b = any(".lora_B." in names[id(p)] for p in g["params"])
            assert g["initial_lr"] == pytest.approx(1e-3 * (factor if is_b else 1.0))
