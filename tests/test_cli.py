"""The `minift` command end to end: subprocesses with tiny step budgets on the built-in task
and minift-tiny, one shared LoRA run for generate / eval / merge / resume, and in-process
calls of `main()` for option handling and user errors (fast: they stop before training)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from minift import GPT, Tokenizer, load_dataset
from minift.checkpoint import resolve_source
from minift.cli import build_parser, main
from minift.commands.finetune import resolve_finetune
from minift.config import TrainConfig
from minift.options import MANAGED, read_config_file
from minift.peft import AdapterConfig, PeftModel, get_peft_model

MODEL = "minift-tiny"
# Budgets: 30 steps learn something; evaluation on a handful of prompts keeps it quick.
SMALL = ["--eval-samples", "8", "--num-samples", "2", "--max-new-tokens", "16"]
LORA_RUN_ARGS = ["--model", MODEL, "--max-steps", 30, "--eval-every", 15, "--log-every", 5,
                 "--no-bf16", *SMALL]   # the shared LoRA run, lora_run
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def minift(*args, check=True, timeout=600, **kwargs):
    """Run `python -m minift ARGS`; returns the CompletedProcess (text mode)."""
    proc = subprocess.run([sys.executable, "-m", "minift", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout, **kwargs)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_main(capsys, *args) -> tuple[int, str, str]:
    """main() in this process -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments):
    """The user sees exactly one line, `minift: error: ...`, and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("minift: error: "), err
    assert "Traceback" not in err
    assert sum(ln.startswith("minift: error") for ln in lines) == 1, err
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One `minift finetune` (LoRA, the default) on the built-in task, shared by the tests."""
    out = tmp_path_factory.mktemp("cli") / "lora"
    proc = minift("finetune", *LORA_RUN_ARGS, "--output-dir", out)
    return out, proc


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


# ----------------------------------------------------------------------------- finetune
def test_finetune_writes_a_run_folder_and_learns(lora_run):
    out, proc = lora_run
    for name in ("config.json", "metrics.jsonl", "report.md", "report.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json"):
        assert (out / name).is_file(), name
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").stat().st_size > 1000


def test_finetune_validation_loss_goes_down(lora_run):
    out, proc = lora_run
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["val_loss"] < report["before"]["val_loss"] - 0.05
    evals = [r["val_loss"] for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "eval"]
    assert len(evals) == 2 and evals[1] < evals[0]
    # what the command printed: both evaluations, the samples and where the run is
    assert "before and after fine-tuning" in proc.stdout and "samples" in proc.stdout
    assert "validation loss" in proc.stdout and str(out) in proc.stdout
    assert "step 30/30" in proc.stderr  # the progress line
    md = (out / "report.md").read_text()
    for text in ("exact match", "ROUGE-L", "reference perplexity", "## Samples", "loss.png"):
        assert text in md


def peft_reference(out):
    """The run's adapter in transformers + PEFT: the independent side of the report checks."""
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel
    base = GPT2LMHeadModel.from_pretrained(resolve_source(MODEL))
    return peft.PeftModel.from_pretrained(base, out / "adapter").eval()


@torch.no_grad()
def nll_sum(model, examples):
    """(summed loss, target tokens) of transformers' loss, one example at a time."""
    total, count = 0.0, 0
    for ex in examples:
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        if n:
            total, count = total + model(input_ids=ids, labels=labels).loss.item() * n, count + n
    return total, count


def test_finetune_report_numbers_are_consistent(lora_run):
    """report.json's validation loss and reference perplexity after training, recomputed with
    transformers + PEFT on the run's own validation examples and reference text."""
    from minift.commands.taskdata import load_task_data
    out, _ = lora_run
    r = json.loads((out / "report.json").read_text())
    a = r["after"]
    tok = Tokenizer.from_pretrained(out / "adapter")
    data = load_task_data(read_config_file(out / "config.json"), tok,
                          GPT.from_pretrained(MODEL).config.n_positions)
    theirs = peft_reference(out)
    total, count = nll_sum(theirs, data.val)
    assert a["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert a["val_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    ids, size = tok.encode(data.reference), data.reference_block
    blocks = [{"input_ids": ids[i:i + size], "labels": ids[i:i + size]}
              for i in range(0, len(ids), size)]
    total, count = nll_sum(theirs, blocks)
    assert a["reference_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert 0 < r["trainable_params"] < r["total_params"]
    assert r["train"]["steps"] == 30 and r["train"]["seconds_per_step"] > 0
    last_eval = [m for m in read_jsonl(out / "metrics.jsonl") if m["event"] == "eval"][-1]
    # restore_best with the last evaluation the best: the final weights are the last step's
    assert a["val_loss"] == pytest.approx(last_eval["val_loss"], rel=1e-6)


def test_saved_config_repeats_the_run(lora_run):
    """--config on the run's config.json resolves to the options the run's own command line
    resolved to (LORA_RUN_ARGS), so the TrainConfig and method are the same."""
    out, _ = lora_run
    saved = read_config_file(out / "config.json")
    assert saved["max_steps"] == 30 and saved["method"] == "lora" and saved["eval_samples"] == 8
    parse = build_parser().parse_args
    again = resolve_finetune(parse(["finetune", "--config", str(out / "config.json")]))
    original = resolve_finetune(parse(["finetune", *map(str, LORA_RUN_ARGS), "--output-dir",
                                       str(out)]))
    assert again.pop("output_dir") != original.pop("output_dir")   # a fresh folder by default
    assert again == original
    assert original["max_steps"] == 30 and original["bf16"] is False


def test_adapter_loads_in_peft_with_equal_logits(lora_run):
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel
    out, _ = lora_run
    base = resolve_source(MODEL)
    theirs = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), out / "adapter")
    ours = PeftModel.from_pretrained(GPT.from_pretrained(MODEL), out / "adapter").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # minift-tiny's logits reach ~20: float32 summation order alone moves them ~1e-5
        torch.testing.assert_close(ours(ids).logits, theirs.eval()(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- inference
def test_generate_from_a_run_equals_the_library(lora_run):
    out, _ = lora_run
    prompt = 'def os.getcwd():\n    """'
    proc = minift("generate", "--run", out, "--prompt", prompt, "--max-new-tokens", 12)
    model = PeftModel.from_pretrained(GPT.from_pretrained(MODEL), out / "adapter").eval()
    tok = Tokenizer.from_pretrained(out / "adapter")
    ids = torch.tensor([tok.encode(prompt)])
    new = model.generate(ids, max_new_tokens=12, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    new = new.tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert proc.stdout == prompt + tok.decode(new) + "\n"


def test_eval_json_matches_the_finetune_report(lora_run):
    out, _ = lora_run
    proc = minift("eval", "--run", out, "--json", "--eval-samples", 4, "--max-new-tokens", 8,
                  "--forgetting", "--bias")
    r = json.loads(proc.stdout)
    report = json.loads((out / "report.json").read_text())
    examples = load_dataset(r["data"], Tokenizer.from_pretrained(out / "adapter"),
                            max_length=GPT.from_pretrained(MODEL).config.n_positions)
    total, count = nll_sum(peft_reference(out), examples)   # transformers + PEFT, per example
    assert r["loss"] == pytest.approx(total / count, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert r["task"]["n"] == 4 and 0 <= r["task"]["rouge_l"] <= 1
    # the same text, blocks, batches and weights as the run's own evaluations
    assert r["reference"]["perplexity"] == pytest.approx(report["after"]["reference_ppl"], rel=1e-6)
    assert r["reference"]["forgetting"]["before"] == pytest.approx(
        report["before"]["reference_ppl"], rel=1e-6)
    assert r["bias"]["n"] == 40


def test_merge_loads_in_transformers_with_the_merged_logits(lora_run, tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    out, _ = lora_run
    minift("merge", "--run", out, "--out", tmp_path / "merged")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    peft_model = PeftModel.from_pretrained(GPT.from_pretrained(MODEL), out / "adapter")
    merged = peft_model.merge_and_unload().eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, merged(ids).logits, rtol=0, atol=1e-4)
    tok = Tokenizer.from_pretrained(out / "adapter")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("def f(x):")["input_ids"] == \
        tok.encode("def f(x):")
    # the folder is a model folder now: a second merge into it is refused
    code, _, err = run_main(capsys, "merge", "--run", out, "--out", tmp_path / "merged")
    assert code == 1
    assert_one_line_error(err, "--overwrite")


def test_merge_refuses_other_adapters(tmp_path, capsys):
    peft_model = get_peft_model(GPT.from_pretrained(MODEL), AdapterConfig(bottleneck_size=4))
    peft_model.save_pretrained(tmp_path / "houlsby")
    code, _, err = run_main(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "houlsby",
                            "--out", tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists()
    assert_one_line_error(err, "HOULSBY_ADAPTER", "only LoRA")


# ----------------------------------------------------------------------------- resume, signals
def test_resume_extends_a_finished_run(lora_run, tmp_path):
    src, _ = lora_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    proc = minift("finetune", "--resume", run, "--max-steps", 34, "--no-eval-before")
    assert "resumed from" in proc.stderr and "step 34/34" in proc.stderr
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "eval"]
    assert steps == [15, 30, 34]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 34
    assert json.loads((run / "report.json").read_text())["train"]["steps"] == 34


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_and_the_run_resumes(tmp_path, signum, code):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "minift", "finetune", "--model", MODEL, "--max-steps", 1000,
           "--log-every", 1, "--eval-every", 1000, "--output-dir", run, "--no-eval-before",
           "--no-forgetting", *SMALL]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").exists():  # training runs
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert signal.Signals(signum).name in err and "Traceback" not in err
    assert f"minift finetune --resume {run}" in err
    assert not (run / "report.json").exists()   # an interrupted run has no report yet
    if signum == signal.SIGINT:
        done = minift("finetune", "--resume", run, "--max-steps", 4, "--no-eval-before")
        assert "resumed from" in done.stderr
        assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_torchrun_two_processes_rank_0_reports(tmp_path):
    pytest.importorskip("torch.distributed.run")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "minift",
           "finetune", "--model", MODEL, "--max-steps", 4, "--eval-every", 2, "--output-dir", out,
           "--no-eval-before", "--no-forgetting", *SMALL]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1 and proc.stderr.count("loading ") == 1
    assert json.loads((out / "report.json").read_text())["train"]["steps"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- compare
def test_compare_quick_has_a_row_for_every_method(tmp_path):
    out = tmp_path / "cmp"
    from minift.tasks import REFERENCE, get_task   # small evaluation files: quicker
    (tmp_path / "val.jsonl").write_text("".join(
        get_task("params").path("validation").read_text().splitlines(keepends=True)[:16]))
    (tmp_path / "ref.txt").write_text(REFERENCE.read_text()[:3000])
    proc = minift("compare", "--quick", "--max-steps", 2, "--eval-every", 2, "--eval-samples", 2,
                  "--val-data", tmp_path / "val.jsonl", "--reference", tmp_path / "ref.txt",
                  "--output-dir", out)
    report = json.loads((out / "report.json").read_text())
    methods = ["full", "partial", "adapter", "lora", "prefix", "prompt", "ptuning", "full+ewc"]
    assert [r["method"] for r in report["methods"]] == methods
    md = (out / "report.md").read_text()
    for r in report["methods"]:
        assert "error" not in r, r
        assert r["train"]["steps"] == 2 and r["trainable_params"] > 0
        assert f"| {r['method']} |" in md
        assert "change" in r["forgetting"]
    shares = {r["method"]: r["trainable_params"] / r["total_params"] for r in report["methods"]}
    assert shares["full"] == 1.0 and shares["lora"] < shares["partial"] < 1.0
    for m in methods:
        assert m in proc.stdout
    pytest.importorskip("matplotlib")
    assert (out / "loss_curves.png").is_file()


# ----------------------------------------------------------------------------- options and errors
def test_help_has_examples_and_every_train_option(capsys):
    for cmd in ([], ["finetune"], ["generate"], ["eval"], ["merge"], ["compare"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "examples:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        if f.name not in MANAGED:
            assert "--" + f.name.replace("_", "-") in text, f.name


def test_config_file_layers(tmp_path):
    (tmp_path / "run.toml").write_text('method = "lora"\nr = 4\nmax-steps = 7\n'
                                       'target_modules = ["c_attn", "c_fc"]\npatience = "none"\n'
                                       'adam_betas = [0.8, 0.99]\n')
    parse = build_parser().parse_args
    opts = resolve_finetune(parse(["finetune", "--config", str(tmp_path / "run.toml"), "--r", "2"]))
    assert opts["r"] == 2 and opts["max_steps"] == 7 and opts["patience"] is None   # flag > file
    assert opts["target_modules"] == ["c_attn", "c_fc"] and opts["adam_betas"] == (0.8, 0.99)
    assert opts["lr"] == 3e-3 and opts["batch_size"] == 16   # the CLI's recipe for LoRA
    full = resolve_finetune(parse(["finetune", "--method", "full"]))
    assert full["lr"] == 1e-3 and "r" not in full
    betas = resolve_finetune(parse(["finetune", "--adam-betas", "0.8", "0.95", "--no-forgetting"]))
    assert betas["adam_betas"] == (0.8, 0.95) and betas["forgetting"] is False
    epochs = resolve_finetune(parse(["finetune", "--epochs", "2"]))
    assert epochs["max_steps"] is None and epochs["epochs"] == 2   # epochs alone counts epochs


@pytest.mark.parametrize("args, code, fragments", [
    (["finetune", "--no-such-option"], 2, ["unrecognized arguments: --no-such-option"]),
    (["finetune", "--max-step", "3"], 2, ["did you mean --max-steps?"]),
    (["finetune", "--method", "qlora"], 2, ["'qlora' is not one of"]),
    (["finetune", "--lr", "fast"], 2, ["--lr", "expected a number"]),
    (["finetune", "--r", "4", "--method", "full"], 2, ["--r applies to --method lora"]),
    (["finetune", "--max-steps", "0"], 2, ["max_steps"]),
    (["finetune", "--threads", "0", "--output-dir", "{tmp}/o"], 2, ["--threads"]),
    (["finetune", "--data", "{tmp}/missing.jsonl", "--output-dir", "{tmp}/o"], 1,
     ["missing.jsonl: no such file"]),
    (["finetune", "--config", "{tmp}/bad.toml"], 2, ["bad.toml: unknown key 'max_stpes'",
                                                     "did you mean 'max_steps'?"]),
    (["finetune", "--config", "{tmp}/broken.toml"], 1, ["not valid TOML"]),
    (["finetune", "--data", "{tmp}/bad.jsonl", "--output-dir", "{tmp}/o"], 1,
     ["bad.jsonl line 2: invalid JSON"]),
    (["finetune", "--resume", "{tmp}", "--config", "{tmp}/bad.toml"], 2, ["drop --config"]),
    (["generate", "--model", "{tmp}/no-model", "--prompt", "x"], 1, ["no-model"]),
    (["compare", "--methods", "lora,qlora"], 2, ["unknown qlora"]),
    (["eval", "--data", "{tmp}/data.xlsx"], 1, ["unknown file type '.xlsx'"]),
])
def test_user_errors_are_one_line(tmp_path, capsys, args, code, fragments):
    (tmp_path / "bad.toml").write_text("max_stpes = 3\n")
    (tmp_path / "broken.toml").write_text("max_steps = = 3\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    (tmp_path / "data.xlsx").write_text("a,b\n")
    got, _, err = run_main(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert got == code, err
    assert_one_line_error(err, *fragments)


def test_an_existing_run_is_refused_unless_overwrite(lora_run, capsys):
    out, _ = lora_run
    code, _, err = run_main(capsys, "finetune", "--output-dir", out)
    assert code == 1
    assert_one_line_error(err, "already holds a run", "--overwrite")
    code, _, err = run_main(capsys, "finetune", "--resume", out, "--method", "full")
    assert code == 2
    assert_one_line_error(err, "--resume cannot change method")


def test_console_errors_have_no_traceback(tmp_path):
    proc = minift("finetune", "--data", tmp_path / "missing.jsonl", check=False, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("minift: error: ")
    assert proc.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- failed commands
QUICK = ["--max-steps", 1, "--eval-every", 1, "--no-eval-before", "--no-forgetting",
         "--eval-samples", 1, "--num-samples", 1, "--max-new-tokens", 4]   # one step, little eval


def folder_state(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_failed_overwrite_keeps_the_old_run(lora_run, tmp_path, capsys):
    """--overwrite with a missing or bad file, model or target module: one error, and the
    finished run is untouched (config.json, adapter/, reports, checkpoints); a good
    --overwrite then replaces all of it."""
    run = tmp_path / "run"
    shutil.copytree(lora_run[0], run)
    state = folder_state(run)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    for bad, code, fragment in [(["--data", tmp_path / "missing.jsonl"], 1, "missing.jsonl"),
                                (["--data", tmp_path / "bad.jsonl"], 1, "bad.jsonl line 2"),
                                (["--model", tmp_path / "no-model"], 1, "no-model"),
                                (["--target-modules", "nosuch"], 2, "--target-modules")]:
        got, _, err = run_main(capsys, "finetune", "--overwrite", "--output-dir", run, *bad)
        assert got == code, err
        assert_one_line_error(err, fragment)
        assert folder_state(run) == state, bad
    code, _, err = run_main(capsys, "finetune", "--overwrite", "--output-dir", run, *QUICK)
    assert code == 0, err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 1


def test_a_failed_resume_leaves_config_json_as_it_was(lora_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lora_run[0], run)
    for f in (run / "checkpoints").glob("*/trainable.safetensors"):
        f.write_bytes(f.read_bytes()[:100])   # every checkpoint truncated
    before = (run / "config.json").read_bytes()
    code, _, err = run_main(capsys, "finetune", "--resume", run, "--max-steps", 40, "--lr", 0.5,
                            "--no-eval-before")
    assert code == 1
    assert_one_line_error(err, "no intact checkpoint")
    assert (run / "config.json").read_bytes() == before


@pytest.mark.parametrize("args, code, fragment", [
    (["--target-modules", "nosuch"], 2, "'nosuch' does not exist"),
    (["--method", "prefix", "--packing"], 2, "--packing"),
    (["--max-new-tokens", -1], 2, "--max-new-tokens"),
    (["--forgetting", "--reference", "{tmp}/empty.txt"], 1, "empty.txt"),
])
def test_option_errors_come_before_the_run_folder(tmp_path, capsys, args, code, fragment):
    """Options that used to fail after the run folder was written (so the corrected command
    was refused: 'already holds a run') fail before it exists."""
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "o"
    got, _, err = run_main(capsys, "finetune", *QUICK, "--output-dir", out,
                           *[str(a).format(tmp=tmp_path) for a in args])
    assert got == code, err
    assert_one_line_error(err, fragment)
    assert not out.exists()


def test_data_can_be_a_saved_datasets_folder_or_a_dataset_id(tmp_path, capsys):
    """--data takes what load_dataset reads: a save_to_disk folder trains; a dataset id is
    looked up in the local cache (its own message), not refused as a missing file."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": f"def f{i}(a):", "completion": " a: required"}
                                for i in range(20)]).save_to_disk(str(tmp_path / "ds"))
    code, _, err = run_main(capsys, "finetune", "--data", tmp_path / "ds", *QUICK,
                            "--output-dir", tmp_path / "o")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "report.json").read_text())["train"]["steps"] == 1
    code, _, err = run_main(capsys, "finetune", "--data", "minift-tests/no-such-set:train",
                            "--output-dir", tmp_path / "p")
    assert code == 1 and "no such file (--data)" not in err
    assert_one_line_error(err, "local datasets cache")


def test_bf16_where_it_is_not_native_is_refused_before_the_run_folder(tmp_path, capsys,
                                                                      monkeypatch):
    """--bf16 on a device without native bf16: one usage error, and no config.json left to
    refuse the next command with (train()'s own check came after the folder was written)."""
    import minift.commands.finetune as finetune
    monkeypatch.setattr(finetune, "native_bf16", lambda device: False)
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "finetune", "--bf16", "--max-steps", "1", "--no-eval-before",
                            "--output-dir", out)
    assert code == 2 and "--bf16 needs a CUDA GPU or a CPU with native bf16" in err
    assert "Traceback" not in err and not out.exists()
