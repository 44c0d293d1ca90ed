"""copy_probe's arithmetic, on stand-in models whose behaviour is known exactly (the real
model's copying is tested in test_assets.py)."""
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

    def generate(self, ids, max_new_tokens, do_sample=False):
        seq = ids[0].tolist()
        for _ in range(max_new_tokens):
            def match(i):   # length of the common suffix of seq[:i + 1] and seq
                k = 0
                while k <= i and seq[i - k] == seq[-1 - k]:
                    k += 1
                return k
            best = max(range(len(seq) - 1), key=match)
            seq.append(seq[best + 1])
        return torch.tensor([seq])


class Constant(Copier):
    def generate(self, ids, max_new_tokens, do_sample=False):
        return torch.cat([ids, torch.zeros(1, max_new_tokens, dtype=ids.dtype)], 1)


def test_a_perfect_copier_scores_one_and_a_constant_model_zero():
    tok = Tokenizer.from_pretrained("minift-tiny")
    got = copy_probe(Copier(), tok, n_trials=10)
    assert got["token_accuracy"] == 1.0 and got["exact"] == 1.0
    got = copy_probe(Constant(), tok, n_trials=10)
    assert got["token_accuracy"] < 0.05 and got["exact"] == 0 and got["n"] == 10
