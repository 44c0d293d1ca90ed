"""Shared by the test_peft_*.py files: minift and PEFT models with equal adapter values."""
import warnings

import torch

from minift import GPT
from minift.peft import get_peft_model

ATOL = 1e-5


def hf_model(folder):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(folder).eval()


def peft_params(peft_model) -> dict:
    """PEFT's parameters under minift's names: PEFT's differences are the adapter name and
    DoRA's magnitude, a module's `.weight` in PEFT and a plain parameter in minift (as in
    both files)."""
    return {n.replace(".default.", ".").replace("lora_magnitude_vector.weight",
                                                "lora_magnitude_vector"): p
            for n, p in peft_model.named_parameters()}


def pair(folder, minift_config, peft_config, seed=0, scale=0.3):
    """(minift PeftModel, PEFT PeftModel) on the same checkpoint, every adapter parameter set
    to the same random values (so LoRA's zero B does not hide a wrong formula)."""
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT warns that GPT-2's Conv1D needs fan_in_fan_out
        theirs = peft.get_peft_model(hf_model(folder), peft_config)
    ours = get_peft_model(GPT.from_pretrained(folder), minift_config)
    copy_random_adapter(ours, theirs, seed, scale)
    return ours, theirs


@torch.no_grad()
def copy_random_adapter(ours, theirs, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    other = {n: p for n, p in peft_params(theirs).items() if p.requires_grad}
    assert sorted(mine) == sorted(other)          # same trainable names, PEFT's names
    for n, p in mine.items():
        v = torch.randn(p.shape, generator=g) * scale
        p.copy_(v)
        other[n].copy_(v)


def batch(B=2, T=7, V=97, seed=0):
    """ids (B, T), a left-padded mask (row 0 starts with 2 pads) and labels with -100 there."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def assert_close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, diff


def cross_load(folder, saved, ours, theirs):
    """minift's saved adapter loaded by PEFT and PEFT's by minift (folders saved/"ours" and
    saved/"theirs"), each giving the logits of the model that wrote the other file.
    Returns (PEFT's model of minift's file, minift's model of PEFT's file)."""
    import peft

    from minift.peft import PeftModel
    ids, mask, _ = batch()
    loaded_peft = peft.PeftModel.from_pretrained(hf_model(folder), saved / "ours")
    assert_close(loaded_peft(input_ids=ids, attention_mask=mask).logits,
                 ours(ids, attention_mask=mask).logits)
    loaded = PeftModel.from_pretrained(GPT.from_pretrained(folder), saved / "theirs")
    assert_close(loaded(ids, attention_mask=mask).logits,
                 theirs(input_ids=ids, attention_mask=mask).logits)
    return loaded_peft, loaded


def assert_matches_peft(ours, theirs, capsys, positions=None, atol=ATOL):
    """minift's and PEFT's logits agree to `atol` on batch() without a mask, with its
    left-padded mask, and with labels too (then the losses as well), and
    print_trainable_parameters prints the same line. `positions`: the length the logits must
    have (virtual tokens included)."""
    ids, mask, labels = batch()
    for kwargs in (dict(), dict(attention_mask=mask), dict(attention_mask=mask, labels=labels)):
        a, b = ours(ids, **kwargs), theirs(input_ids=ids, **kwargs)
        if positions is not None:
            assert a.logits.shape[1] == positions
        assert_close(a.logits, b.logits, atol)
        if "labels" in kwargs:
            assert_close(a.loss, b.loss, atol)
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    mine, peft_line = capsys.readouterr().out.splitlines()
    assert mine == peft_line and mine.startswith("trainable params: ")


def train_steps(model, ids, steps=3, lr=1e-2, seed=0):
    """A few seeded AdamW steps on the LM loss (dropout on); returns the eval-mode loss
    before and after, so the comparison is free of dropout noise."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    with torch.no_grad():
        before = model.eval()(ids, labels=ids).loss.item()
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model.eval()(ids, labels=ids).loss.item()
    return before, after
