"""Do the tests catch the bugs they are named after? Each patch below is a small bug (a flag
that train() ignores, a normalisation done the naive way, ...). For each, this script copies
the working tree to a temporary folder, applies the patch there, runs the tests that should
catch it, and reports `caught` (they failed) or `SURVIVED` (they passed: the tests are too
weak). Not part of CI: it runs the listed tests once per patch.

    python scripts/mutation_check.py              # every patch
    python scripts/mutation_check.py -k compile   # the patches whose name contains "compile"
    python scripts/mutation_check.py --list

Exit code 0 when every patch is caught. A patch whose text is no longer in its file is
reported as `stale` (the code moved: update the patch) and also fails the run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info",
                                     ".pytest_cache", ".hypothesis", "build", "dist")


@dataclass
class Patch:
    name: str
    file: str          # relative to the repository root
    old: str           # must occur exactly once in the file
    new: str
    tests: list[str]   # pytest node ids that must fail with the patch applied


PATCHES = [
    Patch("train ignores gradient_checkpointing", "minift/train.py",
          "_set_checkpointing(gpts, [True] * len(gpts))", "pass",
          ["tests/test_train.py::test_dropout_override_and_gradient_checkpointing_are_explicit"
           "_and_restored"]),
    Patch("GPT.forward never checkpoints", "minift/model.py",
          "if self.gradient_checkpointing and self.training and not use_cache:",
          "if False:",
          ["tests/test_model.py::test_gradient_checkpointing_gives_equal_gradients",
           "tests/test_train.py::test_dropout_override_and_gradient_checkpointing_are_explicit"
           "_and_restored"]),
    Patch("train ignores compile", "minift/train.py",
          "compile_blocks(model)", "pass",
          ["tests/test_fast.py::test_train_with_compile_equals_eager"]),
    Patch("train drops layer_decay", "minift/train.py",
          "layer_decay=config.layer_decay)", "layer_decay=None)",
          ["tests/test_regularize.py::test_train_steps_each_group_with_its_scheduled_lr_times"
           "_decay_to_the_depth"]),
    Patch("train ignores unfreeze_every", "minift/train.py",
          "if config.unfreeze_every is not None:", "if False:",
          ["tests/test_regularize.py::test_gradual_unfreezing_stages_and_frozen_weights_stay"
           "_bit_identical"]),
    Patch("the step leaves out EWC's penalty", "minift/step.py",
          "if ewc is not None:  # after the reduction", "if False:  # after the reduction",
          ["tests/test_regularize.py::test_ewc_keeps_domain_a_better_than_plain_fine_tuning"]),
    Patch("train ignores bf16", "minift/train.py",
          "autocast = _autocast_for(device, bf16)", "autocast = _autocast_for(device, False)",
          ["tests/test_train.py::test_bf16_autocast_on_cpu_stays_close_to_fp32_and_keeps_fp32"
           "_weights"]),
    Patch("train ignores fsdp", "minift/train.py",
          "if config.fsdp and rank_world()[1] > 1:", "if False:",
          ["tests/test_distributed.py::test_fsdp_two_processes_equal_one_with_double"
           "_accumulation"]),
    Patch("accumulation divides by the number of micro-batches", "minift/step.py",
          "(loss * (n / total)).backward()", "(loss / len(batches)).backward()",
          ["tests/test_train.py::test_accumulated_micro_batches_equal_one_batch",
           "tests/test_train.py::test_train_with_accumulation_equals_large_batch"]),
    Patch("the step never clips", "minift/step.py",
          "if coef < 1.0:  # the same rule", "if False:  # the same rule",
          ["tests/test_train.py::test_train_matches_hand_written_reference_loop"]),
    Patch("train ignores dropout", "minift/train.py",
          "if config.dropout is not None:", "if False:",
          ["tests/test_train.py::test_dropout_override_and_gradient_checkpointing_are_explicit"
           "_and_restored"]),
    Patch("train ignores restore_best", "minift/train.py",
          "if config.restore_best:", "if False:",
          ["tests/test_train.py::test_early_stopping_and_restore_best_in_train"]),
]


def run_patch(patch: Patch, timeout: int) -> tuple[str, float, str]:
    """(verdict, seconds, last lines of pytest's output) for one patch."""
    with tempfile.TemporaryDirectory(prefix="minift-mutant-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=COPY_IGNORE)
        target = copy / patch.file
        text = target.read_text(encoding="utf-8")
        if text.count(patch.old) != 1:
            return "stale", 0.0, f"{patch.file}: the patch's text occurs {text.count(patch.old)} times"
        target.write_text(text.replace(patch.old, patch.new), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                                   "no:cacheprovider", *patch.tests], cwd=copy, env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - t0, ""
        seconds = time.perf_counter() - t0
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        if proc.returncode == 1:   # pytest: some test failed
            return "caught", seconds, tail
        if proc.returncode == 0:
            return "SURVIVED", seconds, tail
        return f"error (pytest exit {proc.returncode})", seconds, tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only patches whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the patches and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per patch")
    args = ap.parse_args()
    patches = [p for p in PATCHES if args.k in p.name]
    if args.list:
        for p in patches:
            print(f"{p.name}: {p.file}; {' '.join(p.tests)}")
        return 0
    results = []
    for i, p in enumerate(patches, 1):
        verdict, seconds, tail = run_patch(p, args.timeout)
        results.append((p.name, verdict))
        print(f"[{i}/{len(patches)}] {verdict:8s} {p.name} ({seconds:.0f} s)", flush=True)
        if verdict != "caught":
            print("    " + tail.replace("\n", "\n    "), flush=True)
    caught = sum(v == "caught" for _, v in results)
    print(f"\n{caught} of {len(results)} patches caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
