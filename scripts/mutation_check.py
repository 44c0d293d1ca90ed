"""Do the tests catch the bugs they are named after? Each patch below is a small bug (a flag
that train() ignores, a normalisation done the naive way, ...). First it checks that the
listed tests pass on an unpatched copy of the last commit. Then, for each patch, it copies
the commit to a temporary folder, applies the patch there, runs the tests that should
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
          "layer_decay=config.layer_decay,", "layer_decay=None,",
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
    Patch("the step asks for the full logits", "minift/objectives.py",
          "model(**batch, return_logits=False).loss", "model(**batch, return_logits=True).loss",
          ["tests/test_train.py::test_full_logits_never_exist_at_once_in_a_training_step"]),
    Patch("train ignores loraplus_lr_ratio", "minift/train.py",
          "loraplus_lr_ratio=config.loraplus_lr_ratio)", "loraplus_lr_ratio=None)",
          ["tests/test_optim.py::test_train_gives_lora_b_its_loraplus_lr"]),
    Patch("packed examples attend across each other", "minift/model.py",
          "mask &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]", "pass",
          ["tests/test_packing.py::test_no_token_attends_across_examples"]),
    Patch("packed examples share one position count", "minift/packing.py",
          'out["position_ids"][r, span] = torch.arange(n)',
          'out["position_ids"][r, span] = span.start + torch.arange(n)',
          ["tests/test_packing.py::test_packed_batch_gives_the_padded_batchs_loss_and_gradients"]),
    Patch("train ignores packing", "minift/objectives.py",
          "if config.packing:  # several examples a row", "if False:  # several examples a row",
          ["tests/test_packing.py::test_train_with_packing_equals_unpacked_under_accumulation"]),
    Patch("train ignores restore_best", "minift/train.py",
          "if config.restore_best:", "if False:",
          ["tests/test_train.py::test_early_stopping_and_restore_best_in_train"]),
    Patch("CPU dropout masks keep everything", "minift/ops.py",
          "keep.index_fill_(0, pos[:cut], rare)",
          "keep.index_fill_(0, pos[:0], rare)",
          ["tests/test_ops.py::test_dropout_keeps_a_one_byte_mask_and_scales_the_rest",
           "tests/test_fast.py::test_lora_layer_dropout_draws_one_mask"]),
    Patch("CPU dropout masks' gaps off by one", "minift/ops.py",
          "pos = gaps.cumsum_(0).add_(steps).add_(start)",
          "pos = gaps.add_(1).cumsum_(0).add_(steps).add_(start)",
          ["tests/test_ops.py::test_keep_mask_drops_with_probability_p"]),
    Patch("CPU dropout masks: the rarer outcome the wrong way above 1/2", "minift/ops.py",
          "q, rare = (p, 0) if p <= 0.5 else (1.0 - p, 1)",
          "q, rare = (p, 0) if p <= 0.5 else (1.0 - p, 0)",
          ["tests/test_ops.py::test_keep_mask_drops_with_probability_p"]),
    Patch("compiled masks drawn in no fixed order", "minift/ops.py",
          "return drawn_keep(_DRAW_ORDER, n, p).view(shape)",
          "return drawn_keep(torch.zeros(1, dtype=torch.int8), n, p).view(shape)",
          ["tests/test_fast.py::test_compiled_masks_are_drawn_in_program_order"]),
    Patch("compare's DPO rows alone ignore --val-data", "minift/commands/compare.py",
          "dpo_paths = paths if args.data or not sft else", "dpo_paths = paths if args.data else",
          ["tests/test_preference.py::test_compare_dpo_rows_alone_with_full_dpo"]),
    Patch("the copy probe's batches drop the padding mask", "minift/probes.py",
          'out = model.generate(ids, attention_mask=batch["attention_mask"].to(device),',
          'out = model.generate(ids, attention_mask=torch.ones_like(ids),',
          ["tests/test_assets.py::test_copy_probe_scores_the_same_batched_and_one_line_at_a_time"]),
    Patch("the ratio interval resamples numerators and denominators apart", "minift/stats.py",
          "low, high = _percentiles(num[idx].sum(axis=1) / den[idx].sum(axis=1), confidence)",
          "low, high = _percentiles(num[idx].sum(axis=1) / den[idx[::-1]].sum(axis=1), confidence)",
          ["tests/test_stats.py::test_ratio_interval_covers_a_token_accuracy_of_lines_of_different"
           "_lengths"]),
    Patch("bf16 CPU training without dropout takes SDPA", "minift/ops.py",
          "q.dtype == torch.bfloat16 and not torch.compiler.is_compiling())):",
          "False)):",
          ["tests/test_ops.py::test_bf16_training_without_dropout_takes_the_query_blocks"]),
    Patch("the copy probe ignores the model's context", "minift/probes.py",
          'limit = getattr(getattr(model, "config", None), "n_positions", None)',
          "limit = None",
          ["tests/test_probes.py::test_batches_end_before_the_models_context"]),
    Patch("the head's bf16 softmax never reaches the logits buffer", "minift/loss.py",
          "                if not same:\n                    lj.copy_(e)",
          "                if False:\n                    lj.copy_(e)",
          ["tests/test_loss.py::test_head_softmax_blocks_give_the_same_bits"]),
    Patch("minift plan plans PEFT's LoRA, not finetune's", "minift/commands/plan.py",
          'targets = LORA["target_modules"]', "targets = None",
          ["tests/test_plan.py::test_the_plan_command_counts_what_minift_finetune_trains"]),
    Patch("ROUGE-L on SQuAD's tokens (articles dropped, identifiers joined)", "minift/metrics.py",
          'return _WORD.findall(unicodedata.normalize("NFC", text).lower())',
          "return normalize_tokens(text)",
          ["tests/test_metrics.py::test_rouge_l_equals_the_rouge_score_package_on_ascii_text"]),
    Patch("oneDNN's input gradient multiplies by the weight untransposed", "minift/linear.py",
          "_onednn_t(g, weight.t())",
          "_onednn_t(g, weight.reshape(weight.shape[1], weight.shape[0]))",
          ["tests/test_linear.py::test_products_are_float32_products_of_the_same_accuracy_as_torch"]),
    Patch("the layers never take oneDNN's products", "minift/linear.py",
          "GEMM = \"onednn\"  #", "GEMM = \"mkl\"  #",
          ["tests/test_assets.py::test_float32_logits_with_onednn_are_as_accurate_as_transformers",
           "tests/test_linear.py::test_products_are_float32_products_of_the_same_accuracy_as_torch"]),
    Patch("the head's oneDNN gradient of h skips a chunk's rows", "minift/loss.py",
          "grad_h[i:i + chunk_size] = matmul(logits, wm)",
          "grad_h[i:i + chunk_size] = matmul(logits, wm) * (i == 0)",
          ["tests/test_loss.py::test_masked_chunked_loss_and_gradients_equal_full_logits"]),
    Patch("oneDNN's weight gradient pairs g and x from different rows", "minift/linear.py",
          "_onednn_t(gt, xt) if", "_onednn_t(gt, xt.flip(1)) if",
          ["tests/test_linear.py::test_products_are_float32_products_of_the_same_accuracy_as_torch",
           "tests/test_linear.py::test_a_training_step_is_the_same_with_either_kernel_to_float32s_rounding"]),
    Patch("small products go to oneDNN too", "minift/linear.py",
          "weight.numel() >= MIN_MACS", "weight.numel() >= 0",
          ["tests/test_linear.py::test_small_products_stay_with_mkl"]),
    Patch("set_adapter keeps an adapter loaded for inference frozen", "minift/peft/model.py",
          "self.peft_config.inference_mode = inference_mode",
          "inference_mode = inference_mode or self.peft_config.inference_mode",
          ["tests/test_peft_multi.py::test_load_set_and_disable_adapters_match_peft"]),
    Patch("load_dataset reads preference pairs as completions", "minift/formats.py",
          '"chat": ("messages",), "preference": ("chosen", "rejected")}',
          '"chat": ("messages",), "preference": ("chosen_", "rejected_")}',
          ["tests/test_preference.py::test_load_dataset_reads_preference_pairs_in_every_format"]),
    Patch("task metrics keep an empty prompt", "minift/commands/taskdata.py",
          "if 0 < len(tok.encode(r[\"prompt\"])) <= room]", "if len(tok.encode(r[\"prompt\"])) <= room]",
          ["tests/test_tasks.py::test_an_empty_prompt_trains_but_is_not_a_test_prompt"]),
]


def copy_tree(dest: Path, worktree: bool) -> None:
    """The committed tree (git archive HEAD), or the working tree as it is."""
    if worktree:
        shutil.copytree(ROOT, dest, ignore=COPY_IGNORE)
        return
    dest.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run_tests(copy: Path, tests: list[str], timeout: int) -> tuple[int | None, float, str]:
    """pytest on `tests` in `copy` -> (exit code or None on timeout, seconds, output tail)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                               "no:cacheprovider", *tests], cwd=copy, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0, ""
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode, time.perf_counter() - t0, tail


def run_patch(patch: Patch, timeout: int, worktree: bool) -> tuple[str, float, str]:
    """(verdict, seconds, last lines of pytest's output) for one patch."""
    with tempfile.TemporaryDirectory(prefix="minift-mutant-") as tmp:
        copy = Path(tmp) / "repo"
        copy_tree(copy, worktree)
        target = copy / patch.file
        text = target.read_text(encoding="utf-8")
        if text.count(patch.old) != 1:
            return "stale", 0.0, f"{patch.file}: the text occurs {text.count(patch.old)} times"
        target.write_text(text.replace(patch.old, patch.new), encoding="utf-8")
        code, seconds, tail = run_tests(copy, patch.tests, timeout)
    if code == 1:   # pytest: some test failed
        return "caught", seconds, tail
    if code == 0:
        return "SURVIVED", seconds, tail
    return ("timeout" if code is None else f"error (pytest exit {code})"), seconds, tail


def baseline(patches: list[Patch], timeout: int, worktree: bool) -> bool:
    """Every listed test passes without a patch (else a 'caught' would mean nothing)."""
    tests = sorted({t for p in patches for t in p.tests})
    with tempfile.TemporaryDirectory(prefix="minift-baseline-") as tmp:
        copy_tree(Path(tmp) / "repo", worktree)
        code, seconds, tail = run_tests(Path(tmp) / "repo", tests, timeout * 2)
    print(f"baseline: the {len(tests)} tests {'pass' if code == 0 else 'DO NOT PASS'} "
          f"unpatched ({seconds:.0f} s)", flush=True)
    if code != 0:
        print("    " + tail.replace("\n", "\n    "), flush=True)
    return code == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only patches whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the patches and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per patch")
    ap.add_argument("--worktree", action="store_true",
                    help="patch a copy of the working tree (default: of the last commit)")
    args = ap.parse_args()
    patches = [p for p in PATCHES if args.k in p.name]
    if args.list:
        for p in patches:
            print(f"{p.name}: {p.file}; {' '.join(p.tests)}")
        return 0
    if not baseline(patches, args.timeout, args.worktree):
        return 1
    results = []
    for i, p in enumerate(patches, 1):
        verdict, seconds, tail = run_patch(p, args.timeout, args.worktree)
        results.append((p.name, verdict))
        print(f"[{i}/{len(patches)}] {verdict:8s} {p.name} ({seconds:.0f} s)", flush=True)
        if verdict != "caught":
            print("    " + tail.replace("\n", "\n    "), flush=True)
    caught = sum(v == "caught" for _, v in results)
    print(f"\n{caught} of {len(results)} patches caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
