"""Data-parallel training: 2 processes (gloo, CPU, started by torchrun) equal 1 process
with twice the gradient accumulation, dropout included.

Run by torchrun (`torchrun --nproc_per_node 2 tests/test_distributed.py OUT`), this file
is the worker.
"""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from minift.train import TrainConfig, list_checkpoints, train
from test_train import one_thread, pattern_data, tiny_model  # noqa: F401 (fixture)


def setup(rank=0):
    # Ranks start from different weights: train() broadcasts rank 0's trainable weights.
    model = tiny_model(seed=rank, dropout=0.1)
    model.transformer.wpe.weight.requires_grad_(False)   # a frozen parameter is not reduced
    if rank:
        with torch.no_grad():   # frozen weights must already agree: make them
            model.transformer.wpe.weight.copy_(tiny_model(seed=0).transformer.wpe.weight)
    # 15 examples in micro-batches of 3: 5 per epoch, 3 epochs = 15 micro-batches = 8 steps
    # of 2, the last with a single micro-batch (one process gets nothing).
    data, val = pattern_data(15, seed=1), pattern_data(5, seed=2)
    conf = dict(lr=3e-3, batch_size=3, epochs=3, eval_every=3, eval_batch_size=2,
                max_grad_norm=0.5, warmup_steps=2, log_every=1, save_every=4)
    return model, data, val, conf


def test_two_processes_equal_one_with_double_accumulation(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", __file__, str(out)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    model, data, val, conf = setup()
    ref = train(model, data, val, TrainConfig(**conf, gradient_accumulation_steps=2))
    assert ref.step == 8

    last = list_checkpoints(out)[-1]
    assert last.name == "step-000008"
    got = json.loads((last / "state.json").read_text())["result"]
    assert len(got["train_loss"]) == 8
    for a, b in zip(got["train_loss"], ref.train_loss):
        assert abs(a - b) <= 1e-5
    assert [e["step"] for e in got["evals"]] == [3, 6, 8]
    for a, b in zip(got["evals"], ref.evals):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5
    weights = load_file(str(last / "trainable.safetensors"))
    assert "transformer.wpe.weight" not in weights
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (weights[n] - p.detach()).abs().max().item() <= 1e-5, n
    # only rank 0 wrote: one metrics line per event
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in lines if r["event"] == "eval"] == [
        ("eval", 3), ("eval", 6), ("eval", 8)]
    assert [r["step"] for r in lines if r["event"] == "train"] == list(range(1, 9))


if __name__ == "__main__":   # the torchrun worker
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model, data, val, conf = setup(rank)
    train(model, data, val, TrainConfig(**conf, output_dir=sys.argv[1]))
