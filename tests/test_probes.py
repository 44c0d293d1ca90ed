"""copy_probe's arithmetic, on stand-in models whose behaviour is known exactly (the real
model's copying is tested in test_assets.py)."""
import pytest
import torch
from torch import nn

from minift import Tokenizer
from minift.probes import copy_probe


class Copier(nn.Module):
    """Continues with the token that followed the longest earlier match of the sequence's
    end (induction with the whole context): a perfect copier of a repeated line."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def generate(self, ids, attention_mask, max_new_tokens, do_sample=False):
        rows = []
        for row, mask in zip(ids.tolist(), attention_mask.tolist()):
            n_pad = mask.index(1)        # left padding: the row's tokens come after its pads
            seq = row[n_pad:]
            for _ in range(max_new_tokens):
                def match(i):   # length of the common suffix of seq[:i + 1] and seq
                    k = 0
                    while k <= i and seq[i - k] == seq[-1 - k]:
                        k += 1
                    return k
                best = max(range(len(seq) - 1), key=match)
                seq.append(seq[best + 1])
            rows.append(row[:n_pad] + seq)
        return torch.tensor(rows)


class Constant(Copier):
    def generate(self, ids, attention_mask, max_new_tokens, do_sample=False):
        return torch.cat([ids, torch.zeros(len(ids), max_new_tokens, dtype=ids.dtype)], 1)


def test_a_perfect_copier_scores_one_and_a_constant_model_zero():
    tok = Tokenizer.from_pretrained("minift-tiny")
    got = copy_probe(Copier(), tok, n_trials=10)
    assert got["token_accuracy"] == 1.0 and got["exact"] == 1.0
    got = copy_probe(Constant(), tok, n_trials=10)
    assert got["token_accuracy"] < 0.05 and got["exact"] == 0 and got["n"] == 10


class Half(Copier):
    """Copies, then overwrites every second new token with 0: half the tokens right."""
    def generate(self, ids, attention_mask, max_new_tokens, do_sample=False):
        out = super().generate(ids, attention_mask, max_new_tokens)
        out[:, ids.shape[1]::2] = 0
        return out


def test_the_lines_do_not_depend_on_the_batch():
    """Batches of 3 (the last one short) and one batch of 10 score the same lines."""
    tok = Tokenizer.from_pretrained("minift-tiny")
    assert copy_probe(Copier(), tok, n_trials=10, batch_size=3) == copy_probe(
        Copier(), tok, n_trials=10, batch_size=10)
    got = copy_probe(Half(), tok, n_trials=10, batch_size=3)
    assert 0.4 < got["token_accuracy"] < 0.6 and got["exact"] == 0
    assert got == copy_probe(Half(), tok, n_trials=10, batch_size=10)


class ShortContext(Copier):
    """A copier with a small context that refuses to generate past it, as GPT.generate does."""
    def __init__(self, n_positions):
        super().__init__()
        self.config = type("Config", (), {"n_positions": n_positions})()

    def generate(self, ids, attention_mask, max_new_tokens, do_sample=False):
        if ids.shape[1] + max_new_tokens > self.config.n_positions:
            raise ValueError("generation reached the model's context")
        return super().generate(ids, attention_mask, max_new_tokens)


def test_batches_end_before_the_models_context():
    """A context every line fits in, but not 10 of them padded together (a small tokenizer's
    case: pretrain_tiny's final probe crashed there), scores the lines as one at a time; a
    line that cannot fit at all is one clear error."""
    from minift.probes import probe_lines
    tok = Tokenizer.from_pretrained("minift-tiny")
    ctx, tgt = probe_lines(tok, n_trials=10, n_names=8, seed=0)   # the probe's own lines
    limit = max(len(c) + len(t) for c, t in zip(ctx, tgt))
    assert max(map(len, ctx)) + max(map(len, tgt)) > limit      # one batch of 10 would not fit
    got = copy_probe(ShortContext(limit), tok, n_trials=10, n_names=8, batch_size=10)
    assert got == copy_probe(Copier(), tok, n_trials=10, n_names=8, batch_size=1)
    assert got["token_accuracy"] == 1.0
    with pytest.raises(ValueError, match="copy_probe: line 0 takes .* n_positions=20; use fewer"):
        copy_probe(ShortContext(20), tok, n_trials=3, n_names=8)


def test_a_batch_size_below_one_is_refused():
    tok = Tokenizer.from_pretrained("minift-tiny")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        copy_probe(Copier(), tok, n_trials=3, batch_size=0)
