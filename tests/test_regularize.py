"""EWC, gradual unfreezing and discriminative learning rates, against independent references."""
import copy

import pytest
import torch

from conftest import cfg, max_diff, pattern_data, tiny_model, weights
from minift import GPT
from minift.checkpoint import TRANSPOSED
from minift.config import TrainConfig
from minift.distributed import evaluate_loss
from minift.optim import AdamW
from minift.regularize import EWC, GradualUnfreezing, fisher_diagonal, layer_depth
from minift.train import make_optimizer, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fisher_is_the_mean_of_per_example_squared_gradients(hf_tiny):
    """Reference: transformers' GPT-2 with the same weights, one autograd.grad per example,
    squared, averaged (independent of minift's model and loss code)."""
    folder, hf = hf_tiny
    model = GPT.from_pretrained(folder)
    examples = pattern_data(6, seed=1, min_len=4, max_len=12)
    for n, p in model.named_parameters():                        # a partial model: fewer params
        p.requires_grad_(not n.startswith("transformer.h.0."))
    fisher = fisher_diagonal(model, examples)
    assert set(fisher) == {n for n, p in model.named_parameters() if p.requires_grad}

    hf_params = dict(hf.named_parameters())   # GPT-2's names; Conv1D weights are (in, out)
    ref = {n: torch.zeros_like(f) for n, f in fisher.items()}
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        grads = torch.autograd.grad(hf(input_ids=ids, labels=ids).loss,
                                    [hf_params[n] for n in fisher])
        for n, g in zip(fisher, grads):
            ref[n] += (g.t() if n.endswith(TRANSPOSED) else g).square() / len(examples)
    for n, f in fisher.items():
        assert torch.allclose(f, ref[n], rtol=1e-4, atol=1e-12), n
    assert model.training is False   # fisher_diagonal restored the mode it found (eval here)


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_is_lambda_f_delta():
    model = tiny_model()
    ewc = EWC.from_data(model, pattern_data(4, seed=2), lam=7.0)
    assert ewc.penalty(model).item() == 0.0
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pen = ewc.penalty(model)
    pen.backward()
    params = dict(model.named_parameters())
    expected = sum(0.5 * 7.0 * (ewc.fisher[n].double()
                                * (params[n].double() - ewc.anchor[n].double()) ** 2).sum()
                   for n in ewc.fisher)
    assert pen.item() == pytest.approx(expected.item(), rel=1e-5)
    for n, f in ewc.fisher.items():
        formula = 7.0 * f * (params[n].detach() - ewc.anchor[n])
        assert torch.allclose(params[n].grad, formula, rtol=1e-5, atol=1e-12), n


def test_ewc_keeps_domain_a_better_than_plain_fine_tuning():
    """Pre-train on domain A (stride-3 sequences), fine-tune on B (stride 7) with and
    without EWC: with it, the loss on A stays far lower, and B is still learned."""
    A, B = pattern_data(64, seed=4, stride=3), pattern_data(64, seed=5, stride=7)
    val_a, val_b = pattern_data(16, seed=6, stride=3), pattern_data(16, seed=7, stride=7)
    base = tiny_model()
    train(base, A, config=cfg(max_steps=150, weight_decay=0.0))
    a0, b0 = evaluate_loss(base, val_a), evaluate_loss(base, val_b)
    plain, ewc = copy.deepcopy(base), copy.deepcopy(base)
    train(plain, B, config=cfg(max_steps=60, weight_decay=0.0))
    train(ewc, B, config=cfg(max_steps=60, weight_decay=0.0, ewc_lambda=3e5), reference_data=A[:32])
    a_plain, a_ewc = evaluate_loss(plain, val_a), evaluate_loss(ewc, val_a)
    b_ewc = evaluate_loss(ewc, val_b)
    assert a0 < 1.5                      # A was learned
    assert a_plain > a0 + 2.0            # plain fine-tuning forgets it
    assert a_ewc < a_plain - 1.0         # EWC keeps much more of it (perplexity e^1 lower)
    assert b_ewc < b0 - 1.0              # while still learning B
    with pytest.raises(ValueError, match="needs reference_data"):
        train(copy.deepcopy(base), B, config=cfg(max_steps=1, ewc_lambda=1.0))


def test_gradual_unfreezing_stages_and_frozen_weights_stay_bit_identical():
    model = tiny_model()
    unfreezing = GradualUnfreezing(model, every=2)

    def block(i):
        return {n for n, _ in model.named_parameters() if n.startswith(f"transformer.h.{i}.")}
    ln_f = {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert set(unfreezing.stages[0]) == block(1) | ln_f
    assert set(unfreezing.stages[1]) == block(0)
    assert set(unfreezing.stages[2]) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert [unfreezing.num_unfrozen(s) for s in range(7)] == [1, 1, 2, 2, 3, 3, 3]

    snapshots = {0: weights(model)}
    result = train(model, pattern_data(16, seed=8),
                   config=cfg(max_steps=6, unfreeze_every=2, weight_decay=0.1),
                   callback=lambda r: snapshots.update({r["step"]: weights(model)}))
    assert result.step == 6
    for step in range(1, 7):
        trainable = set().union(*unfreezing.stages[:(step - 1) // 2 + 1])
        for n in snapshots[0]:
            changed = not torch.equal(snapshots[step - 1][n], snapshots[step][n])
            assert changed == (n in trainable), (step, n)   # frozen: no update, no decay
    assert all(p.requires_grad for p in model.parameters())   # restored after training


def test_gradual_unfreezing_skips_empty_stages_and_adamw_skips_frozen():
    model = tiny_model()
    for n, p in model.named_parameters():   # LoRA-like: trainable parameters only in blocks
        p.requires_grad_(n.endswith("attn.c_attn.weight"))
    unfreezing = GradualUnfreezing(model, every=1)
    assert unfreezing.stages == [["transformer.h.1.attn.c_attn.weight"],
                                 ["transformer.h.0.attn.c_attn.weight"]]
    # AdamW with weight decay leaves a frozen parameter alone (its grad is None).
    p, q = (model.get_parameter(f"transformer.h.{i}.attn.c_attn.weight") for i in (0, 1))
    opt = AdamW([p, q], lr=0.1, weight_decay=0.5)
    unfreezing.apply(0)
    before = p.detach().clone()
    ids = torch.tensor([[1, 2, 3]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert p.grad is None and torch.equal(p, before) and p not in opt.state
    unfreezing.restore()
    with pytest.raises(ValueError, match="every"):
        GradualUnfreezing(model, every=0)


def test_layer_wise_learning_rates():
    model = tiny_model()
    optimizer, scheduler = make_optimizer(model, TrainConfig(lr=1e-3, layer_decay=0.5,
                                                             schedule="constant"), 10)
    names = {id(p): n for n, p in model.named_parameters()}
    expected_depth = {"transformer.ln_f": 0, "transformer.h.1": 1, "transformer.h.0": 2,
                      "transformer.wte": 3, "transformer.wpe": 3}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            depth = next(d for prefix, d in expected_depth.items() if n.startswith(prefix + "."))
            assert depth == layer_depth(n, 2)
            assert group["lr"] == pytest.approx(1e-3 * 0.5 ** depth, rel=1e-12), n
            seen.add(n)
    assert seen == set(names.values())


@pytest.mark.parametrize("schedule,warmup,factor", [("constant", 0, 1.0), ("linear", 2, 0.5)])
def test_train_steps_each_group_with_its_scheduled_lr_times_decay_to_the_depth(
        schedule, warmup, factor):
    """Through train(): every step sees the same full batch, so Adam's bias-corrected update
    of an entry is lr_group * g / (|g| + eps) whatever the step, and each parameter's largest
    change in a step is its group's scheduled lr, factor * lr * 0.5**depth (depths as spelled
    out above). With warmup 2 the first step runs at lr 0 and the second at half of it."""
    model, snapshots = tiny_model(), []
    snapshots.append(weights(model))
    train(model, pattern_data(8, seed=9), callback=lambda r: snapshots.append(weights(model)),
          config=cfg(max_steps=warmup + 1, lr=1e-3, layer_decay=0.5, schedule=schedule,
                     warmup_steps=warmup, weight_decay=0.0, max_grad_norm=None, batch_size=8))
    depth = {"transformer.ln_f": 0, "transformer.h.1": 1, "transformer.h.0": 2,
             "transformer.wte": 3, "transformer.wpe": 3}
    if warmup:
        assert max_diff(snapshots[0], snapshots[1]) == 0.0   # lr 0 at the first step
    before, after = (snapshots[1], snapshots[2]) if warmup else (snapshots[0], snapshots[1])
    for n, w in before.items():
        d = next(v for prefix, v in depth.items() if n.startswith(prefix + "."))
        step = (after[n] - w).abs().max().item()
        assert step == pytest.approx(factor * 1e-3 * 0.5 ** d, rel=1e-3), (n, d, step)
