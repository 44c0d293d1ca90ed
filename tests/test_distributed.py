"""Training on 2 processes (gloo, CPU, started by torchrun) equals 1 process with twice the
gradient accumulation, dropout included: data parallel, and sharded with FSDP (fully_shard),
for full fine-tuning and LoRA, including resuming an FSDP checkpoint with and without FSDP.

One torchrun launch runs every scenario (`python -m torch.distributed.run ... this file OUT
NAME...`, this file being the worker); each test compares one of them with a 1-process
reference computed here.
"""
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import pattern_data, tiny_model
from minift import GPT
from minift.data import shuffled_batches
from minift.config import TrainConfig
from minift.rundir import list_checkpoints
from minift.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def fsdp_missing() -> str | None:
    """Why FSDP cannot be tested here, or None."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)"
    return None


def setup(name, rank=0):
    """(model, train data, val data, TrainConfig kwargs) of a scenario, as process `rank`
    builds it. Ranks start from different weights: train() broadcasts rank 0's."""
    if name == "lora":
        return lora_setup(rank)
    if name == "fsdp_partial":
        return partial_setup()
    model = as_loaded(tiny_model(seed=rank, dropout=0.1))
    model.transformer.wpe.weight.requires_grad_(False)   # a frozen parameter is not reduced
    if rank:
        with torch.no_grad():   # frozen weights must already agree: make them
            model.transformer.wpe.weight.copy_(tiny_model(seed=0).transformer.wpe.weight)
    # 15 examples in micro-batches of 3: 5 per epoch, 3 epochs = 15 micro-batches = 8 steps
    # of 2, the last with a single micro-batch (one process gets nothing). 5 validation
    # examples in batches of 2: 3 batches, so one process evaluates one batch less. Under
    # FSDP the validation pattern conflicts with training, so its best step is not the last.
    data = pattern_data(15, seed=1)
    val = pattern_data(5, seed=2, stride=5 if name.startswith("fsdp") else 3)
    conf = dict(lr=3e-3, batch_size=3, epochs=3, eval_every=3, eval_batch_size=2,
                max_grad_norm=0.5, warmup_steps=2, log_every=1, save_every=4)
    if name.startswith("fsdp"):
        # max_grad_norm 5 never clips here (norms 1.0-2.1). Clipping at 0.5 scales each step by
        # 0.5 / norm, a norm that 2 processes sum from shards and 1 process from whole
        # tensors: equal to 1e-7, and Adam at lr 3e-3 made that 8e-5 in the loss by step 8
        # (from bitwise-equal losses up to step 6). Unclipped, the 8 steps are bitwise equal.
        # FSDP's clipping itself is compared in fsdp_partial.
        conf.update(fsdp=True, gradient_checkpointing=True, restore_best=True, max_grad_norm=5.0)
    return model, data, val, conf


def as_loaded(model):
    """`model` as GPT.from_pretrained returns it from a Hugging Face folder: its Conv1D
    weights are transposed views of the file's (in, out) tensors, which FSDP's fully_shard
    refuses until shard_model makes them contiguous."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = GPT.from_pretrained(folder)
    assert not all(p.is_contiguous() for p in loaded.parameters())
    return loaded


def partial_setup():
    """Partial fine-tuning sharded: only the top block and ln_f train; block 0 and the (tied)
    embeddings are frozen, a whole sharded block and most of the root's parameters. Every
    rank builds the same weights (frozen ones are not broadcast)."""
    from minift.peft import freeze_all_but_top
    model = as_loaded(tiny_model(seed=0, dropout=0.1))
    freeze_all_but_top(model, 1)
    conf = dict(lr=3e-3, batch_size=3, epochs=1, eval_every=3, eval_batch_size=2,
                max_grad_norm=0.5, log_every=1, save_every=3, fsdp=True)
    return model, pattern_data(12, seed=5), pattern_data(4, seed=6), conf


def lora_data():
    """10 examples, 3 of them without a target token (all labels -100)."""
    data = pattern_data(10, seed=3)
    for i in (1, 4, 7):
        data[i] = {"input_ids": data[i]["input_ids"], "labels": [-100] * len(data[i]["labels"])}
    return data


def lora_setup(rank):
    from minift.peft import LoraConfig, TaskType, get_peft_model
    base = tiny_model(dropout=0.1)
    torch.manual_seed(100 + rank)   # LoRA's A differs per rank until the broadcast
    model = get_peft_model(base, LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.1,
        target_modules=["c_attn", "c_fc"]))
    # micro-batches of 1: 5 steps of 2, some with one micro-batch that has no target
    conf = dict(lr=1e-2, batch_size=1, epochs=1, log_every=1, save_every=5, eval_every=5,
                fsdp=True, weight_decay=0.1)
    return model, lora_data(), pattern_data(3, seed=4), conf


def reference(name):
    """The 1-process run with accumulation 2: (result, weights at its last step, model)."""
    model, data, val, conf = setup(name)
    conf = {**conf, "fsdp": False, "gradient_accumulation_steps": 2}
    last = {}

    def keep(record):   # the weights of every step, before restore_best changes them
        last.update({n: p.detach().clone() for n, p in model.named_parameters()})
    return train(model, data, val, TrainConfig(**conf), callback=keep), last, model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch the worker once on 2 processes; returns its output folder."""
    out = tmp_path_factory.mktemp("distributed")
    names = ["ddp"] + ([] if fsdp_missing() else ["fsdp", "fsdp_resume", "lora", "fsdp_partial"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", __file__, str(out), *names],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def assert_same_run(folder, reference_run, steps, evals):
    """The last checkpoint of `folder` has the reference's losses, evaluations and weights."""
    ref, ref_weights, ref_model = reference_run
    last = list_checkpoints(folder)[-1]
    assert last.name == f"step-{steps:06d}"
    got = json.loads((last / "state.json").read_text())["result"]
    assert len(got["train_loss"]) == steps
    for a, b in zip(got["train_loss"], ref.train_loss):
        assert abs(a - b) <= 1e-5
    assert [e["step"] for e in got["evals"]] == evals
    for a, b in zip(got["evals"], ref.evals):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5
    saved = load_file(str(last / "trainable.safetensors"))
    assert set(saved) == {n for n, p in ref_model.named_parameters() if p.requires_grad}
    for n, t in saved.items():
        assert (t - ref_weights[n]).abs().max().item() <= 1e-5, n
    return saved


def test_two_processes_equal_one_with_double_accumulation(runs):
    ref = reference("ddp")
    assert ref[0].step == 8
    saved = assert_same_run(runs / "ddp", ref, 8, [3, 6, 8])
    assert "transformer.wpe.weight" not in saved
    # only rank 0 wrote: one metrics line per event
    lines = [json.loads(x) for x in (runs / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in lines if r["event"] == "eval"] == [
        ("eval", 3), ("eval", 6), ("eval", 8)]
    assert [r["step"] for r in lines if r["event"] == "train"] == list(range(1, 9))


needs_fsdp = pytest.mark.skipif(fsdp_missing() is not None, reason=str(fsdp_missing()))


@needs_fsdp
def test_fsdp_two_processes_equal_one_with_double_accumulation(runs):
    """Full fine-tuning sharded over 2 processes (plus a frozen wpe, dropout, gradient
    checkpointing, restore_best): same losses, evaluations, checkpoint and final weights."""
    ref = reference("fsdp")
    assert_same_run(runs / "fsdp", ref, 8, [3, 6, 8])
    report = json.loads((runs / "fsdp" / "report.json").read_text())
    # really sharded: each process held about half of every parameter
    assert report["sharded"] and report["tied"]
    assert report["local_numel"] <= report["numel"] // 2 + 64
    final = load_file(str(runs / "fsdp" / "final.safetensors"))   # after restore_best
    assert ref[0].best_step == 3
    for n, p in ref[2].named_parameters():
        assert (final[n] - p.detach()).abs().max().item() <= 1e-5, n


@needs_fsdp
def test_fsdp_checkpoint_resumes_with_and_without_fsdp(runs, tmp_path):
    """An FSDP checkpoint holds full tensors: resumed at step 4 sharded on 2 processes (in
    the worker) and unsharded on 1 process (here), both end where the reference does."""
    ref = reference("fsdp")
    assert_same_run(runs / "fsdp_resume", ref, 8, [3, 6, 8])
    here = tmp_path / "run"
    shutil.copytree(runs / "fsdp", here)
    shutil.rmtree(here / "checkpoints" / "step-000008")
    model, data, val, conf = setup("fsdp")
    train(model, data, val, TrainConfig(**{**conf, "fsdp": False, "resume": True,
                                           "gradient_accumulation_steps": 2},
                                        output_dir=str(here)))
    assert_same_run(here, ref, 8, [3, 6, 8])


@needs_fsdp
def test_fsdp_lora_with_idle_processes(runs):
    """LoRA on a sharded frozen base; some steps have a micro-batch without targets, so one
    process runs an idle pass while the other trains."""
    order = [b[0] for b in shuffled_batches(lora_data(), 1, seed=0, epoch=0)]
    empty = [all(t == -100 for t in ex["labels"]) for ex in order]
    steps = [empty[i:i + 2] for i in range(0, len(empty), 2)]
    assert [True, False] in steps or [False, True] in steps   # the case under test occurs
    assert_same_run(runs / "lora", reference("lora"), 5, [5])


@needs_fsdp
def test_fsdp_partial_fine_tuning(runs):
    """freeze_all_but_top(model, 1) sharded over 2 processes equals 1 process: the frozen
    block and embeddings stay as they were, and only the top block and ln_f are saved."""
    ref = reference("fsdp_partial")
    saved = assert_same_run(runs / "fsdp_partial", ref, 2, [2])
    assert {n.split(".")[1] + n.split(".")[2] for n in saved} == {"h1", "ln_fweight", "ln_fbias"}
    report = json.loads((runs / "fsdp_partial" / "report.json").read_text())
    assert report["sharded"] and report["local_numel"] <= report["numel"] // 2 + 64
    final, start = load_file(str(runs / "fsdp_partial" / "final.safetensors")), tiny_model(seed=0)
    for n, p in start.named_parameters():
        assert torch.equal(final[n], p.detach()) == (n not in saved), n   # frozen: unchanged


def test_import_minift_leaves_fsdp_unimported():
    """torch's FSDP (slow to import, with sympy) is imported by shard_model, not by minift."""
    code = ("import sys, minift\n"
            "print('torch.distributed.fsdp' in sys.modules, 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------- the worker
def run_scenario(out, name, rank):
    from minift.distributed import gather_to_rank0, is_sharded, local
    model, data, val, conf = setup("fsdp" if name == "fsdp_resume" else name, rank)
    folder = out / name
    if name == "fsdp_resume":   # the fsdp run's folder as it was at step 4
        if rank == 0:
            shutil.copytree(out / "fsdp", folder)
            shutil.rmtree(folder / "checkpoints" / "step-000008")
        torch.distributed.barrier()
        conf["resume"] = True
    train(model, data, val, TrainConfig(**conf, output_dir=str(folder)))
    if name not in ("fsdp", "fsdp_partial"):
        return
    params = dict(model.named_parameters())
    report = {"sharded": is_sharded(model),
              "tied": model.lm_head.weight is model.transformer.wte.weight,
              "numel": sum(p.numel() for p in params.values()),
              "local_numel": sum(local(p).numel() for p in params.values())}
    final = gather_to_rank0(params)   # every rank takes part; rank 0 gets the tensors
    if rank == 0:
        save_file(final, str(folder / "final.safetensors"))
        (folder / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":   # python -m torch.distributed.run ... test_distributed.py OUT NAME...
    from pathlib import Path
    torch.set_num_threads(1)
    out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    for scenario in sys.argv[2:]:   # the first train() creates the process group, the rest reuse it
        run_scenario(out, scenario, rank)
    # Free the sharded models (reference cycles keep them alive) before the group goes: with
    # them alive, destroying it aborted a process now and then ("terminate called without an
    # active exception"; 1 in 40 runs of a minimal script, none in 120 with this collect).
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
