"""The training loop against hand-written references: accumulation, AdamW + clipping +
schedule wiring, early stopping, resume, checkpoints, signals, non-finite guards, memory.

Run as a script (`python tests/test_train.py OUT STEPS KILL_AT`), this file is the worker
that the SIGKILL test starts in a subprocess.
"""
import gc
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import cfg, max_diff, pattern_data, tiny_model, weights
from minift.data import shuffled_batches
from minift.config import TrainConfig
from minift.distributed import evaluate_loss
from minift.loss import HEAD_CHUNK
from minift.regularize import EarlyStopping, restore_dropout, set_dropout
from minift.rundir import Progress, list_checkpoints
from minift.step import NonFiniteError, accumulate_gradients
from minift.train import TrainingInterrupted, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- accumulation
def plain_batch(examples, pad=0):
    """Right-padded input_ids, attention_mask and labels (-100 on padding), written out."""
    T = max(len(e["input_ids"]) for e in examples)
    fill = [T - len(e["input_ids"]) for e in examples]
    return {"input_ids": torch.tensor([e["input_ids"] + [pad] * f for e, f in zip(examples, fill)]),
            "attention_mask": torch.tensor([[1] * (T - f) + [0] * f for f in fill]),
            "labels": torch.tensor([e["labels"] + [-100] * f for e, f in zip(examples, fill)])}


def test_accumulated_micro_batches_equal_one_batch():
    """8 variable-length padded examples at once == 4 micro-batches of 2 (gradients, loss)."""
    model = tiny_model()
    data = pattern_data(8, seed=1, min_len=4, max_len=30, prompt=2)
    whole = plain_batch(data)
    ref_loss = model(**whole).loss            # full-logits path, mean over all 8 examples
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    micro = [plain_batch(data[i:i + 2]) for i in range(0, 8, 2)]
    sums = accumulate_gradients(model, micro)
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    got = {n_: p.grad.clone() for n_, p in model.named_parameters()}
    assert abs(sums.sum().item() / n - ref_loss.item()) <= 1e-6
    assert max_diff(got, ref) <= 1e-6

    # The test can fail: the common mistake (mean of micro-batch means) is far off.
    model.zero_grad(set_to_none=True)
    for b in micro:
        (model(**b).loss / len(micro)).backward()
    naive = {n_: p.grad.clone() for n_, p in model.named_parameters()}
    assert max_diff(naive, ref) > 1e-3


def test_train_with_accumulation_equals_large_batch():
    data = pattern_data(32, seed=2, prompt=1)
    a, b = tiny_model(), tiny_model()
    ra = train(a, data, config=cfg(max_steps=3, batch_size=8))
    rb = train(b, data, config=cfg(max_steps=3, batch_size=2, gradient_accumulation_steps=4))
    assert ra.train_loss == pytest.approx(rb.train_loss, abs=1e-6)
    # Gradients agree to ~1e-7 (test above); Adam divides by sqrt(v), which magnifies
    # rounding differences of near-zero gradient entries, hence 1e-5 on weights.
    assert max_diff(weights(a), weights(b)) <= 1e-5


def test_train_matches_hand_written_reference_loop():
    """AdamW + decay groups + global-norm clipping + linear warmup, written with torch's own
    classes and none of minift's helpers, on the same batches: same weights."""
    data = pattern_data(30, seed=3)   # 5 batches of 6: one epoch
    conf = cfg(max_steps=5, batch_size=6, warmup_steps=2, max_grad_norm=0.05, weight_decay=0.1,
               schedule="linear")
    model, ref = tiny_model(), tiny_model()
    result = train(model, data, config=conf)

    # weight decay on the matrices only: not on biases, LayerNorms or the embeddings
    plain = [(n, p) for n, p in ref.named_parameters()]   # the tied lm_head once, as wte
    no_decay = [p for n, p in plain if n.endswith("bias") or ".ln_" in n or "wte" in n
                or "wpe" in n]
    decay = [p for n, p in plain if all(p is not q for q in no_decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=3e-3, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s / 2, (5 - s) / 3))
    # the data order TrainConfig.seed fixes: a permutation from a generator seeded with
    # seed * 1_000_003 + epoch (data.shuffled_batches' documented rule; seed 0, epoch 0)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()
    ref.train()
    losses = []
    for step in range(5):
        out = ref(**plain_batch([data[j] for j in perm[6 * step:6 * step + 6]]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert result.train_loss == pytest.approx(losses, abs=1e-6)
    assert max_diff(weights(model), weights(ref)) <= 1e-6


def test_evaluate_loss_is_the_mean_over_all_target_tokens():
    model = tiny_model()
    val = pattern_data(7, seed=4, min_len=3, max_len=30, prompt=2)
    got = evaluate_loss(model, val, batch_size=3)   # uneven batches: 3 + 3 + 1
    with torch.no_grad():
        total, count = 0.0, 0
        for ex in val:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logits = model(ids).logits[0, :-1]
            keep = labels != -100
            total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert got == pytest.approx(total / count, abs=1e-6)


def test_training_reduces_validation_loss():
    model = tiny_model(dropout=0.1)
    train_data, val = pattern_data(64, seed=5), pattern_data(16, seed=6)
    before = evaluate_loss(model, val)
    result = train(model, train_data, val, cfg(max_steps=150, eval_every=50, warmup_steps=10))
    after = evaluate_loss(model, val)
    assert before > 4.0                            # about ln(97): an untrained model
    assert after < 0.5 * before
    assert result.evals[-1]["val_loss"] == pytest.approx(after, abs=1e-6)
    assert model.training is True                  # mode restored (a fresh GPT is in train mode)


# ----------------------------------------------------------------------------- early stopping
def test_early_stopping_fires_after_exactly_patience_evaluations():
    es = EarlyStopping(patience=3, min_delta=0.1)
    fired = [es(x) for x in [2.0, 1.5, 1.45, 1.41, 1.5]]
    # 1.45 and 1.41 improve on 1.5 by less than min_delta: no improvement; the 3rd is 1.5
    assert fired == [False, False, False, False, True]
    assert es.best_loss == 1.5 and es.counter == 3 and es.early_stop
    es2 = EarlyStopping(patience=2)
    assert [es2(x) for x in [1.0, 0.9, 0.95, 0.89, 0.89, 0.9]] == [False] * 5 + [True]
    assert es2.best_loss == 0.89
    es3 = EarlyStopping(patience=1)
    assert es3(float("nan")) is True and es3.best_loss is None   # nan is no improvement
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_early_stopping_and_restore_best_in_train():
    """Validation on a conflicting pattern gets worse after a while; training stops after
    `patience` bad evaluations and restore_best puts back exactly the best weights."""
    model = tiny_model()
    train_data = pattern_data(64, seed=7, stride=3)
    val = pattern_data(16, seed=8, stride=5)
    snapshots = {}

    def keep(record):
        if "val_loss" in record:
            snapshots[record["step"]] = weights(model)

    result = train(model, train_data, val, cfg(max_steps=400, eval_every=5, patience=3,
                                               restore_best=True), callback=keep)
    assert result.stopped == "early_stopping"
    steps = [e["step"] for e in result.evals]
    assert steps[-1] - result.best_step == 3 * 5           # exactly `patience` evaluations later
    assert result.best_val_loss == min(e["val_loss"] for e in result.evals)
    best = snapshots[result.best_step]
    assert result.best_step != steps[-1] and max_diff(snapshots[steps[-1]], best) > 0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), best[n]), n


# ----------------------------------------------------------------------------- resume
def stop_at(step):
    return lambda record: record["step"] == step


def test_resume_gives_identical_weights(tmp_path):
    """20 steps straight == 10 steps, stop, resume, 10 more; with dropout, warmup, a
    cosine schedule, accumulation and epochs wrapping around."""
    data = pattern_data(12, seed=9)
    conf = dict(max_steps=20, batch_size=3, gradient_accumulation_steps=2, warmup_steps=4,
                schedule="cosine", save_every=5, eval_every=4, log_every=3)
    val = pattern_data(5, seed=10)
    straight = tiny_model(dropout=0.1)
    r1 = train(straight, data, val, cfg(output_dir=str(tmp_path / "a"), **conf))

    part = tiny_model(dropout=0.1)
    r2 = train(part, data, val, cfg(output_dir=str(tmp_path / "b"), **conf), callback=stop_at(10))
    assert r2.step == 10 and r2.stopped == "callback"
    with pytest.raises(ValueError, match="already holds a training run"):
        train(tiny_model(dropout=0.1), data, val, cfg(output_dir=str(tmp_path / "b"), **conf))
    resumed = tiny_model(dropout=0.1)
    r3 = train(resumed, data, val, cfg(output_dir=str(tmp_path / "b"), resume=True, **conf))
    assert r3.step == 20
    assert max_diff(weights(straight), weights(resumed)) <= 1e-7
    assert r3.train_loss == r1.train_loss and r3.evals == r1.evals

    def events(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]
    assert events("a") == events("b")                      # one line per event, no duplicates
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == [
        "step-000010", "step-000015", "step-000020"]      # keep_last=3


def test_overwrite_replaces_a_previous_run(tmp_path):
    data = pattern_data(8, seed=11)
    train(tiny_model(), data, config=cfg(output_dir=str(tmp_path), max_steps=2))
    (tmp_path / "notes.txt").write_text("mine")
    r = train(tiny_model(), data, config=cfg(output_dir=str(tmp_path), max_steps=1, overwrite=True))
    assert r.step == 1 and (tmp_path / "notes.txt").read_text() == "mine"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]


# ----------------------------------------------------------------------------- reliability
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, __file__, str(out), "20", "12"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list_checkpoints(out)[-1].name == "step-000010"
    resumed, straight = tiny_model(dropout=0.1), tiny_model(dropout=0.1)
    data, conf = worker_setup(str(out), 20)
    train(resumed, data, config=TrainConfig(**{**conf, "resume": True}))
    train(straight, data, config=TrainConfig(**{**conf, "output_dir": None}))
    assert max_diff(weights(straight), weights(resumed)) <= 1e-6


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capsys):
    data = pattern_data(12, seed=12)
    conf = dict(max_steps=20, save_every=5, dropout=0.1, output_dir=str(tmp_path))
    train(tiny_model(), data, config=cfg(**conf), callback=stop_at(15))
    victim = tmp_path / "checkpoints" / "step-000015" / (
        "optimizer.pt" if damage == "truncate" else "trainable.safetensors")
    blob = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(blob[:len(blob) // 2])
    elif damage == "corrupt":
        victim.write_bytes(blob[:-10] + bytes(b ^ 0xFF for b in blob[-10:]))
    else:
        (victim.parent / "manifest.json").unlink()   # as if killed before the manifest
    (tmp_path / "checkpoints" / ".tmp-step-000020").mkdir()   # a write cut short: ignored
    resumed = tiny_model()
    train(resumed, data, config=cfg(**conf, resume=True))
    err = capsys.readouterr().err
    assert "step-000015 is damaged" in err and "resumed from" in err and "step-000010" in err
    straight = tiny_model()
    train(straight, data, config=cfg(**{**conf, "output_dir": None}))
    assert max_diff(weights(straight), weights(resumed)) <= 1e-7


def test_no_intact_checkpoint_is_an_error(tmp_path):
    data = pattern_data(8, seed=13)
    train(tiny_model(), data, config=cfg(output_dir=str(tmp_path), max_steps=2))
    (tmp_path / "checkpoints" / "step-000002" / "state.json").write_text("{}")
    with pytest.raises(ValueError, match="no intact checkpoint"):
        train(tiny_model(), data, config=cfg(output_dir=str(tmp_path), max_steps=2, resume=True))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_checkpoints_and_resumes(tmp_path, signum):
    data = pattern_data(12, seed=14)
    conf = cfg(max_steps=12, save_every=100, dropout=0.1, output_dir=str(tmp_path))
    before = signal.getsignal(signum)

    def send(record):
        if record["step"] == 4:
            os.kill(os.getpid(), signum)

    model = tiny_model()
    with pytest.raises(TrainingInterrupted) as info:
        train(model, data, config=conf, callback=send)
    assert info.value.exit_code == 128 + signum
    msg = str(info.value)
    assert "after step 5" in msg and "step-000005" in msg and "resume=True" in msg
    assert signal.getsignal(signum) is before               # handler restored
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000005"]
    resumed = tiny_model()
    train(resumed, data, config=TrainConfig(**{**conf.__dict__, "resume": True}))
    straight = tiny_model()
    train(straight, data, config=TrainConfig(**{**conf.__dict__, "output_dir": None}))
    assert max_diff(weights(straight), weights(resumed)) <= 1e-7


def test_second_sigint_aborts_at_once_and_extra_sigterms_are_ignored():
    from minift.rundir import StopSignals
    said = []
    with StopSignals(said.append) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)            # e.g. torchrun forwarding: ignored
        assert signals.signum == signal.SIGTERM and len(said) == 1
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class PoisonedLoss(torch.nn.Module):
    """GPT whose loss is nan on any batch holding token `poison` (a NaN injected in data)."""

    def __init__(self, gpt, poison):
        super().__init__()
        self.gpt, self.poison, self.config = gpt, poison, gpt.config

    def forward(self, input_ids=None, **kw):
        out = self.gpt(input_ids=input_ids, **kw)
        if (input_ids == self.poison).any():
            out.loss = out.loss * float("nan")
        return out


def test_nan_loss_in_a_batch_names_the_step_and_batch():
    data = pattern_data(16, seed=15, stride=2)
    poisoned = 11
    data[poisoned] = {"input_ids": [5, 96, 7, 8], "labels": [5, 96, 7, 8]}
    data = [ex if i == poisoned else {"input_ids": [t if t != 96 else 95 for t in ex["input_ids"]],
                                      "labels": [t if t != 96 else 95 for t in ex["labels"]]}
            for i, ex in enumerate(data)]
    order = [ex for b in shuffled_batches(data, 4, seed=0, epoch=0) for ex in b]
    batch = order.index(data[poisoned]) // 4           # the reference: the data order function
    expected = rf"step {batch + 1}: the loss is nan .*epoch 0, batch {batch}\)"
    with pytest.raises(NonFiniteError, match=expected):
        train(PoisonedLoss(tiny_model(), 96), data, config=cfg(max_steps=4))


def test_nan_gradient_stops_or_is_skipped():
    data = pattern_data(16, seed=16)
    name = "transformer.h.0.mlp.c_fc.weight"
    for policy in ("stop", "skip"):
        model = tiny_model()
        calls = []

        def nan_on_third_backward(grad):
            calls.append(1)
            return grad * float("nan") if len(calls) == 3 else grad
        model.get_parameter(name).register_hook(nan_on_third_backward)
        if policy == "stop":
            with pytest.raises(NonFiniteError, match=rf"step 3: non-finite gradient .* in {name}"):
                train(model, data, config=cfg(max_steps=5))
        else:
            before = {}
            res = train(model, data, config=cfg(max_steps=5, nonfinite="skip"),
                        callback=lambda r: before.update({r["step"]: weights(model)}))
            assert res.skipped_steps == [3] and res.step == 5
            assert max_diff(before[2], before[3]) == 0         # the bad step changed nothing
            assert all(torch.isfinite(q).all() for q in model.parameters())


def test_memory_stays_flat_over_300_steps():
    """No tensor or graph kept per step: the number of live tensors is the same at step
    50 and 300, and the process RSS grows < 5% (measured after warm-up)."""
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    seen = {}

    def measure(record):
        if record["step"] in (50, 300):
            seen[record["step"]] = (live_tensors(), rss())

    model = tiny_model(n_layer=1, n_embd=16, n_head=2, dropout=0.1)
    train(model, pattern_data(32, seed=17, max_len=12), pattern_data(4, seed=18),
          cfg(max_steps=300, batch_size=2, eval_every=25, max_grad_norm=1.0), callback=measure)
    (t50, m50), (t300, m300) = seen[50], seen[300]
    assert t300 <= t50
    assert m300 < 1.05 * m50, (m50, m300)


# ----------------------------------------------------------------------------- options
def test_bad_config_values_give_clear_errors(tmp_path):
    for kw, field in [({"batch_size": 0}, "batch_size"), ({"schedule": "exp"}, "schedule"),
                      ({"nonfinite": "ignore"}, "nonfinite"), ({"lr": -1}, "lr"),
                      ({"max_steps": 0}, "max_steps"), ({"dropout": 1.0}, "dropout"),
                      ({"gradient_accumulation_steps": 1.5}, "gradient_accumulation_steps"),
                      ({"resume": True}, "resume"), ({"fsdp": True, "ewc_lambda": 1.0}, "fsdp"),
                      ({"fsdp": True, "unfreeze_every": 2}, "fsdp")]:
        with pytest.raises(ValueError, match=f"TrainConfig.{field} "):
            TrainConfig(**kw)
    conf = TrainConfig()
    conf.batch_size = -1                                  # changed after construction
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny_model(), pattern_data(4), config=conf)
    with pytest.raises(ValueError, match="need val_data"):
        train(tiny_model(), pattern_data(4), config=TrainConfig(patience=2))
    with pytest.raises(ValueError, match="is empty"):
        train(tiny_model(), [], config=TrainConfig())
    with pytest.raises(ValueError, match=r"train_data\[1\]: token id 200 is outside"):
        train(tiny_model(), [{"input_ids": [1, 2], "labels": [1, 2]},
                             {"input_ids": [1, 200], "labels": [1, 200]}], config=TrainConfig())
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, pattern_data(4), config=TrainConfig())


def test_fsdp_in_one_process_is_plain_training(capsys):
    """fsdp=True only shards under torchrun; alone it says so and trains as usual (the
    2-process FSDP tests are in test_distributed.py)."""
    data = pattern_data(8, seed=25)
    a, b = tiny_model(), tiny_model()
    train(a, data, config=cfg(max_steps=2, fsdp=True))
    assert "fsdp=True has no effect in a single process" in capsys.readouterr().err
    train(b, data, config=cfg(max_steps=2))
    assert max_diff(weights(a), weights(b)) == 0


def test_partial_fine_tuning_trains_only_the_trainable_subset(tmp_path):
    model = tiny_model()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("transformer.h.1."))
    before = weights(model)
    train(model, pattern_data(16, seed=19), config=cfg(max_steps=3, output_dir=str(tmp_path)))
    after = weights(model)
    for n in before:
        changed = not torch.equal(before[n], after[n])
        assert changed == n.startswith("transformer.h.1."), n
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert set(saved) == {n for n in before if n.startswith("transformer.h.1.")}
    assert all(torch.equal(saved[n], after[n]) for n in saved)


def test_lora_model_trains_only_adapters_and_resumes_exactly(tmp_path):
    from minift.peft import LoraConfig, TaskType, get_peft_model

    def lora_model():
        return get_peft_model(tiny_model(dropout=0.1),
                              LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                                         lora_dropout=0.1))
    data = pattern_data(12, seed=24)
    conf = dict(max_steps=8, save_every=4, lr=1e-2, output_dir=str(tmp_path))
    straight, part, resumed = lora_model(), lora_model(), lora_model()
    before = weights(straight)
    train(straight, data, config=cfg(**{**conf, "output_dir": None}))
    after = weights(straight)
    for n in before:
        assert torch.equal(before[n], after[n]) != ("lora_" in n), n   # only LoRA moves
    train(part, data, config=cfg(**conf), callback=stop_at(4))
    train(resumed, data, config=cfg(**conf, resume=True))
    assert max_diff(after, weights(resumed)) <= 1e-7


def test_dropout_override_and_gradient_checkpointing_are_explicit_and_restored():
    data = pattern_data(16, seed=20)
    a = tiny_model(dropout=0.3)
    b = tiny_model(dropout=0.0)
    train(a, data, config=cfg(max_steps=3, dropout=0.0))       # override to 0 == a 0-dropout model
    train(b, data, config=cfg(max_steps=3))
    assert max_diff(weights(a), weights(b)) == 0
    assert a.transformer.drop.p == 0.3 and a.transformer.h[0].attn.attn_pdrop == 0.3
    previous = set_dropout(a, 0.5)
    assert {m.p for m in a.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}
    restore_dropout(a, previous)
    assert {m.p for m in a.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}

    c, d = tiny_model(dropout=0.1), tiny_model(dropout=0.1)   # checkpointing recomputes the
    calls = {"c": 0, "d": 0}                                  # same dropout masks
    for name, m in (("c", c), ("d", d)):   # each block's forward, counted (recomputes included;
        for block in m.transformer.h:      # a pre-hook, as torch ends a recompute early)
            block.register_forward_pre_hook(lambda *_, k=name: calls.update({k: calls[k] + 1}))
    train(c, data, config=cfg(max_steps=3, gradient_checkpointing=True))
    train(d, data, config=cfg(max_steps=3))
    assert max_diff(weights(c), weights(d)) <= 1e-6
    # 3 steps x 1 micro-batch x 2 blocks: once each without checkpointing, twice with it
    assert (calls["c"], calls["d"]) == (12, 6)
    assert c.gradient_checkpointing is False


def test_progress_line_and_metrics(tmp_path, capsys):
    data, val = pattern_data(16, seed=21), pattern_data(4, seed=22)
    train(tiny_model(), data, val, cfg(max_steps=6, log_every=2, eval_every=3,
                                       output_dir=str(tmp_path)))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("step ") and "/6" in x]
    assert [x.split()[1] for x in lines] == ["2/6", "4/6", "6/6"]   # not a TTY: every log_every
    assert "tok/s" in lines[0] and "ETA" in lines[0] and "\r" not in err
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records] == [
        ("train", 2), ("eval", 3), ("train", 4), ("train", 6), ("eval", 6)]

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    sys_stderr, sys.stderr = sys.stderr, term
    try:
        p = Progress(total=3, log_every=10, enabled=True)
        for s in (1, 2, 3):
            p.update(s, 1.0, 1e-3, 100.0, 5.0)
        p.close()
    finally:
        sys.stderr = sys_stderr
    assert term.getvalue().count("\r") == 3 and term.getvalue().endswith("\n")


# ----------------------------------------------------------------------------- SIGKILL worker
def worker_setup(out, steps):
    data = pattern_data(12, seed=23)
    conf = dict(lr=3e-3, batch_size=4, max_steps=steps, save_every=5, log_every=1000,
                eval_every=1000, dropout=0.1, warmup_steps=3, output_dir=out)
    return data, conf


if __name__ == "__main__":   # python tests/test_train.py OUT STEPS KILL_AT
    torch.set_num_threads(1)
    out, steps, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data, conf = worker_setup(out, steps)

    def die(record):
        if record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(tiny_model(dropout=0.1), data, config=TrainConfig(**conf), callback=die)


def test_bf16_autocast_on_cpu_stays_close_to_fp32_and_keeps_fp32_weights():
    """bf16=True on a CPU with native bf16: the matmuls run in bf16 (checked on the logits'
    dtype inside the step), weights and AdamW state stay fp32, and the losses of 20 steps
    stay within 2% of fp32's (bf16 has an 8-bit mantissa: ~0.4% per rounding)."""
    from minift.distributed import cpu_has_native_bf16
    if not cpu_has_native_bf16():
        with pytest.raises(ValueError, match="native bf16"):
            train(tiny_model(), pattern_data(8, seed=1), config=cfg(max_steps=1, bf16=True))
        return
    data = pattern_data(32, seed=7)
    runs = {}
    for bf16 in (False, True):
        model, dtypes = tiny_model(), []
        hook = model.transformer.h[0].attn.c_attn.register_forward_hook(
            lambda m, i, o: dtypes.append(o.dtype))
        result = train(model, data, config=cfg(max_steps=20, bf16=bf16))
        hook.remove()
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        runs[bf16] = result.train_loss
        assert set(dtypes) == {torch.bfloat16 if bf16 else torch.float32}
    assert runs[True] == pytest.approx(runs[False], rel=0.02)
    assert runs[True] != runs[False]


def test_full_logits_never_exist_at_once_in_a_training_step():
    """The README's claim, measured: while train() runs a step, no tensor as large as the
    (targets x vocab) logits is created (every op's outputs are watched); the plain forward
    with logits, the control, does create one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    V, T, B = 4096, 128, 16   # logits 16 x 127 x 4096 = 8.3M entries; chunks of 512 x 4096
    model = tiny_model(vocab_size=V, n_positions=T)
    data = [{"input_ids": [(7 * i + j) % V for j in range(T)]} for i in range(B)]
    data = [{**ex, "labels": ex["input_ids"]} for ex in data]
    full = B * (T - 1) * V
    with Largest() as seen:
        train(model, data, config=cfg(max_steps=1, batch_size=B))
    assert seen.largest <= HEAD_CHUNK * V <= full // 3, (seen.largest, full)   # one chunk's block
    with Largest() as control:
        ids = torch.tensor([ex["input_ids"] for ex in data])
        model(ids, labels=ids, return_logits=True).loss.backward()
    assert control.largest >= full


# ----------------------------------------------------------------------------- failing before files
def test_inputs_are_checked_before_the_run_folder_is_written(tmp_path):
    """packing with virtual tokens, or nothing to train: the error comes before run.json
    (so a folder that then holds no run is not refused as one by the corrected call)."""
    from minift.peft import PromptTuningConfig, get_peft_model
    prompt = get_peft_model(tiny_model(), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="packed rows .segment_ids. are not supported"):
        train(prompt, pattern_data(8), config=cfg(output_dir=str(tmp_path / "a"), max_steps=1,
                                                  packing=True))
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(tiny_model().requires_grad_(False), pattern_data(8),
              config=cfg(output_dir=str(tmp_path / "b"), max_steps=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
