"""Shared fixtures: tiny random GPT-2 checkpoints written by transformers itself."""
import pytest
import torch

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
