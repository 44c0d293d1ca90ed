"""Shared fixtures: tiny random GPT-2 checkpoints written by transformers itself, and the
tiny models, learnable data and helpers of the training tests (test_train, test_regularize,
test_distributed, test_fuzz import them: `from conftest import ...`)."""
import math
import random

import pytest
import torch

from minift.ops import MASK_DRAWS

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64)


def make_hf_gpt2(folder, seed=0, **overrides):
    """Save a random transformers GPT2LMHeadModel (eval mode) to `folder`; return it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(**{**TINY, **overrides})
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """(folder, transformers model) of a tiny random GPT-2."""
    folder = tmp_path_factory.mktemp("hf_tiny")
    return folder, make_hf_gpt2(folder)


# ----------------------------------------------------------------------------- training helpers
@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and the machine is shared); restored after.
    Opt in per module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed=0, dropout=0.0, **overrides):
    """A random minift GPT of the TINY shape; `dropout` sets GPT-2's three rates."""
    from minift.model import GPT, GPTConfig
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, "embd_pdrop": dropout, "attn_pdrop": dropout,
                            "resid_pdrop": dropout, **overrides}))


def pattern_data(n, seed=0, stride=3, min_len=6, max_len=24, prompt=0):
    """Arithmetic token sequences mod 97: learnable, variable length. The first `prompt`
    labels are -100 (a prompt without loss)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = rng.randrange(97), rng.randrange(min_len, max_len + 1)
        ids = [(start + stride * i) % 97 for i in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def reference_keep(shape, p):
    """The dropout mask keep_mask draws on the CPU, by its definition and without its code,
    one element at a time in Python: the rarer outcome (a drop for p <= 1/2, else a keep;
    probability q) falls at positions whose gaps are floor(log U / log(1 - q)), with
    U = (b + 1) / 2^53 for 53-bit integers b that torch's generator draws in rounds of
    k = min(MASK_DRAWS, int(n q + 6 sqrt(n q (1 - q))) + 16). A bool tensor of `shape`."""
    n = torch.Size(shape).numel()
    q, rare = (p, False) if p <= 0.5 else (1 - p, True)
    keep = [not rare] * n
    if q > 0 and n:
        k = min(MASK_DRAWS, int(n * q + 6 * math.sqrt(n * q * (1 - q))) + 16)
        position = -1
        while position < n:
            for b in torch.empty(k, dtype=torch.int64).random_(0, 2**53).tolist():
                position += 1 + math.floor(math.log((b + 1) / 2**53) / math.log(1 - q))
                if position >= n:
                    break
                keep[position] = rare
    return torch.tensor(keep, dtype=torch.bool).view(shape)


def weights(model):
    """A detached copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def cfg(**kw):
    """A TrainConfig with the training tests' defaults: a high lr, no logging or evaluation,
    fp32 (bf16=None would turn autocast on for CPUs with native bf16; the references are fp32)."""
    from minift.config import TrainConfig
    base = dict(lr=3e-3, batch_size=4, log_every=1000, eval_every=1000, weight_decay=0.01,
                bf16=False)
    return TrainConfig(**{**base, **kw})
