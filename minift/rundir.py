"""The run folder: what a training run writes, how it survives a crash, how it resumes;
and the run's console: the progress line, and the signals that stop it with a checkpoint.

    output_dir/
      run.json                  the config of the run (marks the folder as a run)
      metrics.jsonl             one JSON object per log / eval event
      checkpoints/step-000100/  trainable.safetensors, optimizer.pt, rng.safetensors,
                                state.json, and manifest.json (sha256 and size of each file)
      best/                     trainable.safetensors + state.json of the best evaluation

Each checkpoint is written into a temporary folder, fsynced, then renamed into place, so a
crash leaves either the whole checkpoint or none; the manifest catches later damage
(truncation, bit flips), and resume then falls back to the previous checkpoint.
optimizer.pt holds only tensors and plain containers and is read with
`torch.load(weights_only=True)`: nothing is unpickled. Rank 0 writes; every rank reads on
resume, so output_dir must be on a filesystem all ranks see. Under FSDP every rank takes
part in gathering the full tensors (distributed.gather_to_rank0); the files are the same.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from .io import save_safetensors, write_json, write_text
from .trackers import config_dict, scalars
from .distributed import (barrier, gather_optimizer_state, gather_to_rank0, is_sharded, local,
                          rank_world, shard_like, shard_optimizer_state)

RUN_FILES = ("run.json", "metrics.jsonl", "checkpoints", "best")
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- folders
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some platforms/filesystems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def write_checkpoint_dir(final: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Atomically create `final` holding one file per writer, plus manifest.json (sha256 of
    each file, written last): write into a temporary folder, fsync, rename into place."""
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    manifest = {}
    for name, write in writers.items():
        write(tmp / name)
        _fsync(tmp / name)
        manifest[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    write_json(tmp / "manifest.json", {"files": manifest})
    _fsync(tmp / "manifest.json")
    _fsync(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():  # replacing (e.g. best/): move the old one aside, then swap
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)


def verify_checkpoint_dir(folder: Path) -> str | None:
    """None if every file matches manifest.json, else what is wrong."""
    try:
        files = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["files"]
        expected = {name: (int(meta["bytes"]), str(meta["sha256"])) for name, meta in files.items()}
    except FileNotFoundError:
        return "manifest.json is missing (the checkpoint was not finished)"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"manifest.json is unreadable ({type(e).__name__}: {e})"
    for name, (size, digest) in expected.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():  # a file of this folder, nothing else
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size} (truncated?)"
        if _sha256(path) != digest:
            return f"{name} does not match its sha256 (corrupted)"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    folder = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*")
             if p.is_dir() and (m := _STEP_DIR.match(p.name))] if folder.is_dir() else []
    return [p for _, p in sorted(found)]


def prepare_output_dir(out: Path, config) -> None:
    """Refuse a folder holding another run (unless resume / overwrite), then, on rank 0,
    clear it for overwrite=True and write run.json. Every rank checks before rank 0 writes."""
    if any((out / f).exists() for f in RUN_FILES) and not (config.resume or config.overwrite):
        raise ValueError(f"{out} already holds a training run; pass resume=True to continue it "
                         "or overwrite=True to start again (this deletes its checkpoints)")
    barrier()
    if rank_world()[0] != 0:
        return
    if config.overwrite:
        for f in RUN_FILES:
            path = out / f
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "run.json").exists():
        write_json(out / "run.json", {"config": config_dict(config)})


# ----------------------------------------------------------------------------- a run's state
class Run:
    """The mutable state of one training run and the files that record it.

    result (a TrainResult) and es (an EarlyStopping) are the caller's objects; save() and
    resume() move them, the position in the data (epoch, batch), the trainable weights,
    the optimizer, the scheduler and the RNG states to and from a checkpoint. Under FSDP
    saving gathers full tensors, so every rank calls save() and save_best().
    """

    def __init__(self, model, config, optimizer, scheduler, trainable, out: Path | None,
                 progress, result, es):
        self.model, self.config = model, config
        self.optimizer, self.scheduler = optimizer, scheduler
        self.trainable = trainable                    # [(name, param)] at the start of train()
        self.out, self.progress, self.result, self.es = out, progress, result, es
        self.rank, self.world = rank_world()
        self.sharded = is_sharded(model)              # FSDP
        self.epoch, self.batch = 0, 0                 # position of the next micro-batch
        self.best_state: dict[str, torch.Tensor] | None = None   # for restore_best: a CPU
        # copy of this process's part of the trainable weights (all of them without FSDP)
        self.last_saved = -1
        self.trackers: list = []                      # trackers.py; set by train() on rank 0
        self.summary: dict = {}                       # what train() opened trackers finish with

    def log(self, record: dict) -> None:
        """A metrics.jsonl line, and the same numbers to every tracker (rank 0)."""
        if self.rank != 0:
            return
        if self.out is not None:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        for t in self.trackers:
            t.log_metrics(scalars(record), record["step"])

    def _weights(self) -> dict[str, torch.Tensor]:
        return gather_to_rank0({n: p for n, p in self.trainable})

    def save(self) -> None:
        step = self.result.step
        if self.out is None or self.last_saved == step:
            return
        self.last_saved = step
        weights, optimizer = self._weights(), gather_optimizer_state(self.optimizer)
        if self.rank != 0:
            return
        # train() draws its own randomness from per-micro-batch seeds (inside fork_rng), so
        # it needs no RNG state; the process's RNG states are saved and restored so that a
        # resumed process continues the caller's random streams as an uninterrupted one would.
        state = {"step": step, "epoch": self.epoch, "batch": self.batch,
                 "early_stopping": self.es.state_dict(), "result": dataclasses.asdict(self.result),
                 "python_rng": random.getstate(),   # (version, tuple of ints, gauss): JSON-able
                 "world_size": self.world, "config": config_dict(self.config)}
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        write_checkpoint_dir(self.out / "checkpoints" / f"step-{step:06d}", {
            "trainable.safetensors": lambda p: save_safetensors(p, weights),
            "optimizer.pt": lambda p: torch.save({"optimizer": optimizer,
                                                  "scheduler": self.scheduler.state_dict()}, p),
            "rng.safetensors": lambda p: save_safetensors(p, rng),
            "state.json": lambda p: write_json(p, state),
        })
        for old in list_checkpoints(self.out)[:-self.config.keep_last]:
            shutil.rmtree(old)

    def save_best(self, val_loss: float) -> None:
        if self.config.restore_best:  # this process's part only (all of it without FSDP)
            self.best_state = {n: local(p).detach().to("cpu", copy=True)
                               for n, p in self.trainable}
        if self.out is None:
            return
        weights = self._weights()
        if self.rank == 0:
            info = {"step": self.result.step, "val_loss": val_loss}
            write_checkpoint_dir(self.out / "best", {
                "trainable.safetensors": lambda p: save_safetensors(p, weights),
                "state.json": lambda p: write_json(p, info)})

    def restore_best(self) -> None:
        with torch.no_grad():
            for n, p in self.trainable:
                local(p).copy_(self.best_state[n])

    # -- resume
    def resume(self) -> None:
        """Load the newest intact checkpoint; damaged ones are reported and skipped."""
        damaged = []
        for folder in reversed(list_checkpoints(self.out)):
            problem = verify_checkpoint_dir(folder)
            if problem is None:
                return self._load(folder)
            damaged.append(folder)
            self.progress.say(f"checkpoint {folder} is damaged: {problem}")
        if damaged:
            raise ValueError(f"{self.out}: no intact checkpoint to resume from "
                             f"({len(damaged)} damaged); start again with overwrite=True")
        self.progress.say(f"{self.out}: no checkpoint yet, starting from the beginning")
        self._truncate_metrics()

    def _load(self, folder: Path) -> None:
        weights = load_file(str(folder / "trainable.safetensors"))
        names = {n for n, _ in self.trainable}
        if set(weights) != names:
            diff = sorted(set(weights) ^ names)[:3]
            raise ValueError(f"{folder}: its trainable parameters differ from the model's "
                             f"(e.g. {diff}); resume with the same model and strategy")
        with torch.no_grad():
            for n, p in self.trainable:
                local(p).copy_(local(shard_like(weights[n], p)))
        path = folder / "optimizer.pt"
        try:  # weights_only: tensors and plain containers only; any other object is refused
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: [^.]*", str(e))
            raise ValueError(f"{path}: refused: it holds Python objects, not only tensors and "
                             f"containers ({found[0] if found else e}), and minift never "
                             "unpickles those; resume from a checkpoint minift wrote") from None
        except (RuntimeError, EOFError, OSError) as e:   # not a torch.save zip file at all
            raise ValueError(f"{path}: not a readable optimizer state ({e})") from None
        try:
            self.optimizer.load_state_dict(shard_optimizer_state(saved["optimizer"],
                                                                 self.optimizer))
        except (ValueError, KeyError, TypeError) as e:  # e.g. other parameter groups
            raise ValueError(f"{path}: {e}; resume with the same model, strategy and "
                             "optimizer options") from None
        self.scheduler.load_state_dict(saved["scheduler"])
        rng = load_file(str(folder / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.es.load_state_dict(state["early_stopping"])
        self.result = dataclasses.replace(self.result, **{**state["result"], "stopped": ""})
        self.last_saved = self.result.step
        if state["world_size"] != self.world:
            self.progress.say(f"note: {folder} was written by {state['world_size']} processes, "
                              f"now {self.world}; steps keep their size only if "
                              "processes x gradient_accumulation_steps is unchanged")
        self._load_best()
        self._truncate_metrics()
        self.progress.say(f"resumed from {folder} (step {self.result.step})")

    def _load_best(self) -> None:
        """best/ may be ahead of the checkpoint (written after it): then the resumed run
        reaches that evaluation again and rewrites it. Only a matching step is loaded."""
        if not self.config.restore_best or self.result.best_step is None:
            return
        folder = self.out / "best"
        if not folder.is_dir():
            folder = self.out / ".old-best"   # a crash mid-swap leaves the previous one here
        problem = verify_checkpoint_dir(folder) if folder.is_dir() else "it is missing"
        if problem is None:
            info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            if info["step"] == self.result.best_step:
                full = load_file(str(folder / "trainable.safetensors"))
                self.best_state = {n: local(shard_like(full[n], p)).cpu()
                                   for n, p in self.trainable}
                return
            problem = f"it holds step {info['step']}, not {self.result.best_step}"
        self.progress.say(f"note: cannot load the best weights (step {self.result.best_step}) "
                          f"from {folder}: {problem}; restore_best will use a later best, if any")

    def _truncate_metrics(self) -> None:
        """Drop metrics.jsonl lines of steps after the checkpoint: they will be redone."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= self.result.step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a crash
        write_text(path, "".join(x + "\n" for x in keep))


# ----------------------------------------------------------------------------- console, signals
class Progress:
    """One status line on stderr: rewritten with \\r on a terminal, a plain line every
    log_every steps otherwise (logs, CI). Silent when disabled (ranks > 0)."""

    def __init__(self, total: int, log_every: int, enabled: bool):
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.pending_cr = False

    def say(self, message: str) -> None:
        if self.enabled:
            if self.pending_cr:
                sys.stderr.write("\n")
                self.pending_cr = False
            print(message.lstrip("\n"), file=sys.stderr, flush=True)

    def update(self, step, loss, lr, tokens_per_s, eta_s) -> None:
        if not self.enabled or not (self.tty or step % self.log_every == 0 or step == self.total):
            return
        eta = time.strftime("%H:%M:%S", time.gmtime(eta_s)) if math.isfinite(eta_s) else "?"
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3g} | "
                f"{tokens_per_s:,.0f} tok/s | ETA {eta}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(78))
            sys.stderr.flush()
            self.pending_cr = True
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.pending_cr:
            sys.stderr.write("\n")
            self.pending_cr = False


class StopSignals:
    """While active, SIGINT/SIGTERM only set `self.signum`; training checks it after each
    step. A second SIGINT (Ctrl-C twice) aborts at once; further SIGTERMs are ignored
    (torchrun forwards a SIGTERM after the terminal's SIGINT; a scheduler that loses
    patience sends SIGKILL anyway). The previous handlers come back on exit."""

    def __init__(self, say: Callable[[str], None]):
        self.signum, self.say, self.previous = None, say, {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt("second SIGINT: aborting without a checkpoint")
            return
        self.signum = signum
        self.say(f"\n{signal.Signals(signum).name} received: finishing this step and writing a "
                 "checkpoint (send it again to abort at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals are main-thread only
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
