"""Packing (minift/packing.py): packed rows give the padded batch's loss and gradients,
with no attention across examples, in a plain forward, under gradient accumulation and
in train()."""
import random

import pytest
import torch

from conftest import TINY, pattern_data, tiny_model
from minift.data import collate
from minift.packing import collate_packed, pack

pytestmark = pytest.mark.usefixtures("one_thread")


def chat_like(n, seed=0):
    """Prompt/completion examples of 3..30 tokens whose prompt labels are -100."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length, prompt = rng.randrange(3, 31), rng.randrange(0, 3)
        ids = [rng.randrange(TINY["vocab_size"]) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_pack_is_first_fit_decreasing_and_keeps_every_example():
    lengths = [5, 9, 3, 7, 2, 9, 1]
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[1, 6], [5], [3, 2], [0, 4]]   # 9+1, 9, 7+3, 5+2: 4 rows for 36 tokens
    with pytest.raises(ValueError, match="11 tokens does not fit a row of 10"):
        pack([11, 2], 10)


def test_collate_packed_restarts_positions_and_hides_example_starts():
    ex = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5]},
          {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}]
    b = collate_packed(ex, pad_token_id=0)
    assert b["input_ids"].tolist() == [[6, 7, 8, 9], [1, 2, 3, 0], [4, 5, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 0]]
    b = collate_packed(ex, pad_token_id=0, row_length=6)
    assert b["input_ids"].tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, -1, -1, -1]]
    assert b["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    # example starts carry no target (the previous example's last token would predict them)
    assert b["labels"].tolist() == [[-100, 7, 8, 9, -100, 5], [-100, 2, 3, -100, -100, -100]]
    with pytest.raises(ValueError, match="example 0: 2 input_ids but 1 labels"):
        collate_packed([{"input_ids": [1, 2], "labels": [1]}], 0)
    with pytest.raises(ValueError, match="at least one example"):
        collate_packed([], 0)


def grads_of(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_packed_batch_gives_the_padded_batchs_loss_and_gradients(method):
    """Dropout off: loss and every gradient within 1e-6, and the same number of targets."""
    from minift.distributed import count_targets
    model = tiny_model(seed=0)
    if method == "lora":
        from minift.peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    model.train()
    examples = chat_like(12, seed=1)
    padded, packed = collate(examples, 0), collate_packed(examples, 0)
    assert len(packed["input_ids"]) < len(padded["input_ids"])   # it did pack
    assert count_targets(packed) == count_targets(padded)
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()
    loss_a, g_a = grads_of(model, padded)
    loss_b, g_b = grads_of(model, packed)
    assert abs(loss_a - loss_b) <= 1e-6
    assert g_a.keys() == g_b.keys() and g_a
    for n in g_a:
        assert (g_a[n] - g_b[n]).abs().max() <= 1e-6, n


def test_no_token_attends_across_examples():
    """Each example's logits in a packed row equal its logits alone, and changing one
    example's tokens changes no other example's logits."""
    model = tiny_model(seed=2).eval()
    examples = chat_like(6, seed=3)
    b = collate_packed(examples, 0, row_length=64)
    assert len(b["input_ids"]) == 2
    with torch.no_grad():
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        for r in range(2):
            for s in b["segment_ids"][r].unique().tolist():
                if s < 0:
                    continue
                where = b["segment_ids"][r] == s
                alone = model(b["input_ids"][r][where][None]).logits[0]
                assert (logits[r][where] - alone).abs().max() <= 1e-5
        changed = b["input_ids"].clone()
        changed[b["segment_ids"] == 0] = 1
        other = model(input_ids=changed, attention_mask=b["attention_mask"],
                      position_ids=b["position_ids"], segment_ids=b["segment_ids"]).logits
    rest = b["segment_ids"] > 0
    assert (other[rest] - logits[rest]).abs().max() <= 1e-6
    assert (other[b["segment_ids"] == 0] - logits[b["segment_ids"] == 0]).abs().max() > 1e-3


def test_no_attention_across_examples_under_dropout():
    """Training with every dropout on (CPU: ops.AttentionDropout under the block-diagonal
    mask): with the same masks drawn, changing example 0 changes no other example."""
    model = tiny_model(seed=0, dropout=0.1).train()
    b = collate_packed(chat_like(8, seed=4), 0, row_length=64)
    changed = dict(b, input_ids=b["input_ids"].masked_fill(b["segment_ids"] == 0, 1))
    out = []
    for batch in (b, changed):
        torch.manual_seed(5)
        out.append(model(**batch).logits.detach())
    rest = b["segment_ids"] > 0
    assert (out[0][rest] - out[1][rest]).abs().max() <= 1e-6
    assert (out[0][~rest] - out[1][~rest]).abs().max() > 1e-3


def test_segment_ids_with_past_or_wrong_shape_are_refused():
    model = tiny_model().eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="segment_ids has shape"):
        model(ids, segment_ids=torch.zeros(1, 5, dtype=torch.long))
    past = model(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="no past_key_values"):
        model(ids, past_key_values=past, segment_ids=torch.zeros(1, 4, dtype=torch.long))


def train_run(packing, accumulation=2, method="full"):
    """Weights and losses after 3 steps of train() (dropout off), and every batch the model
    was given."""
    from conftest import cfg
    from minift.train import train
    model = tiny_model(seed=0)
    if method == "prompt":
        from minift.peft import PromptTuningConfig, get_peft_model
        model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=2))
    seen, losses = [], []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    config = cfg(packing=packing, gradient_accumulation_steps=accumulation, max_steps=3)
    train(model, chat_like(24, seed=6), config=config,
          callback=lambda rec: losses.append(rec["loss"]))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, seen


def test_train_with_packing_equals_unpacked_under_accumulation():
    """TrainConfig(packing=True): the model gets packed rows (segment_ids, fewer rows), and
    3 steps of 2 accumulated micro-batches give the unpacked run's losses (1e-6) and weights
    (1e-5: AdamW divides by sqrt(v), which magnifies 1e-9 gradient differences on elements
    whose gradient is near 0)."""
    packed, losses_p, seen_p = train_run(True)
    plain, losses_u, seen_u = train_run(False)
    assert len(seen_p) == len(seen_u) == 6 and len(losses_p) == 3
    assert all("segment_ids" in kw for kw in seen_p)
    assert not any("segment_ids" in kw for kw in seen_u)
    assert sum(len(kw["input_ids"]) for kw in seen_p) < sum(len(kw["input_ids"]) for kw in seen_u)
    assert max(abs(a - b) for a, b in zip(losses_p, losses_u)) <= 1e-6
    for n in plain:
        assert (packed[n] - plain[n]).abs().max() <= 1e-5, n


def test_accumulated_packed_micro_batches_give_the_padded_gradients():
    """The step's token-count normalisation over packed micro-batches: each micro-batch
    weighs in by its target count, the same counts as padded, so the same gradients."""
    from minift.step import accumulate_gradients
    examples = chat_like(12, seed=7)
    grads = []
    for make in (collate, collate_packed):
        model = tiny_model(seed=1).train()
        batches = [make(examples[:5], 0), make(examples[5:], 0)]
        sums = accumulate_gradients(model, batches)
        grads.append(({n: p.grad for n, p in model.named_parameters()}, sums))
    (g_a, s_a), (g_b, s_b) = grads
    assert ((s_a - s_b).abs() / s_a).max() <= 1e-6   # each micro-batch's summed loss (fp32)
    for n in g_a:
        assert (g_a[n] - g_b[n]).abs().max() <= 1e-6, n


def test_packing_with_virtual_tokens_or_dpo_is_refused():
    with pytest.raises(ValueError, match="packed rows .segment_ids. are not supported"):
        train_run(True, method="prompt")
    from conftest import cfg
    with pytest.raises(ValueError, match="TrainConfig.packing applies to objective='sft' only"):
        cfg(packing=True, objective="dpo")
