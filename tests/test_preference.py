"""DPO (minift.preference): sequence log-probabilities against a plain per-token loop, the
loss against the paper's formula in float64, the reference as the model with its adapter
disabled, the preference records and their errors, and training that separates the pairs."""
import json
import math
from pathlib import Path

import pytest
import torch

from minift import load_dataset
from minift.formats import DataError
from minift.peft import LoraConfig, get_peft_model
from minift.preference import (add_reference_logps, collate_preferences, dpo_batch_loss,
                               dpo_loss, encode_preferences, load_preferences,
                               preference_metrics, preference_pairs, read_preferences,
                               sequence_logps)
from minift.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    corpus = ["Question: what is two plus two? Answer: four.", "The cat sat on the mat.",
              "red green blue yellow", "one two three four five"] * 10
    return Tokenizer.train_bpe(corpus, vocab_size=300)


def test_sequence_logps_equal_a_plain_per_token_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :2] = -100          # a prompt
    labels[1, 4:] = -100          # padding
    labels[2, :] = -100
    labels[2, 3] = 5              # one target token
    expected = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        for t in range(1, 6):     # token t is predicted from position t - 1
            if labels[i, t] != -100:
                logp = logits[i, t - 1].double() - logits[i, t - 1].double().exp().sum().log()
                expected[i] += logp[labels[i, t]]
    assert torch.allclose(sequence_logps(logits, labels).double(), expected, atol=1e-5)


@pytest.mark.parametrize("pc, pr, rc, rr, beta", [
    (-1.0, -3.0, -2.0, -2.0, 0.5),     # chosen up, rejected down
    (-5.0, -5.0, -5.0, -5.0, 0.1),     # policy == reference: log 2
    (-2.0, -1.0, -4.0, -6.0, 1.0),     # the policy prefers the rejected one
    (-80.0, -10.0, -12.0, -30.0, 2.0),  # far apart: no overflow
])
def test_dpo_loss_is_the_papers_formula_in_float64(pc, pr, rc, rr, beta):
    """-log sigmoid(beta [(pc - rc) - (pr - rr)]) (Rafailov et al. 2023, Eq. 7), written as
    log(1 + exp(-z)) with math in float64; rewards beta (log pi - log pi_ref) (§4, Eq. 5)."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    losses, cr, rj = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta)
    z = beta * ((pc - rc) - (pr - rr))
    expected = math.log1p(math.exp(-z)) if z > 0 else -z + math.log1p(math.exp(z))
    assert abs(losses.item() - expected) < 1e-12
    assert abs(cr.item() - beta * (pc - rc)) < 1e-12 and abs(rj.item() - beta * (pr - rr)) < 1e-12
    p = t(pc).requires_grad_()
    dpo_loss(p, t(pr), t(rc), t(rr), beta)[0].sum().backward()
    assert abs(p.grad.item() + beta / (1 + math.exp(z))) < 1e-12   # d/dpc = -beta sigmoid(-z)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_records_encode_with_labels_on_the_completion_only(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Question: two plus two?", "chosen": " four.", "rejected": " the cat."}])
    [ex] = load_preferences(path, tok)
    p, c, r = (tok(["Question: two plus two?", " four.", " the cat."])["input_ids"])
    eos = tok.eos_token_id
    assert ex["chosen_input_ids"] == p + c + [eos]
    assert ex["chosen_labels"] == [-100] * len(p) + c + [eos]
    assert ex["rejected_input_ids"] == p + r + [eos]
    batch = collate_preferences([ex, ex], pad_token_id=eos)
    assert batch["input_ids"].shape[0] == 4                     # chosen rows, then rejected
    assert torch.equal(batch["input_ids"][0, :len(c) + len(p) + 1], torch.tensor(p + c + [eos]))
    assert torch.equal(batch["input_ids"][2, :len(r) + len(p) + 1], torch.tensor(p + r + [eos]))
    assert "reference_logps" not in batch


def test_load_dataset_reads_preference_pairs_in_every_format(tok, tmp_path):
    """load_dataset gives a preference file's DPO examples, as load_preferences does; a CSV
    with other column names reads through `fields`, as every other kind does."""
    recs = [{"prompt": "Q: two plus two?", "chosen": " four.", "rejected": " the cat."},
            {"prompt": "Q: the sky?", "chosen": " blue.", "rejected": " seven."}]
    want = load_preferences(write_jsonl(tmp_path / "p.jsonl", recs), tok, max_length=64)
    assert load_dataset(tmp_path / "p.jsonl", tok, max_length=64) == want
    rows = ["question,good,bad"] + [",".join(f'"{r[k]}"' for k in ("prompt", "chosen", "rejected"))
                                     for r in recs]
    (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
    fields = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert load_dataset(tmp_path / "p.csv", tok, max_length=64, fields=fields) == want
    assert load_preferences(tmp_path / "p.csv", tok, 64, fields) == want
    with pytest.raises(DataError, match=r"p\.csv line 1|p\.csv row 1"):
        load_dataset(tmp_path / "p.csv", tok, max_length=64)   # columns not mapped
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"c\.jsonl line 1: a 'completion' record; preference"):
        read_preferences(tmp_path / "c.jsonl")


def test_a_record_missing_rejected_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: missing \"rejected\""):
        read_preferences(path)
    write_jsonl(path, [{"prompt": "a", "chosen": 3, "rejected": "c"}])
    with pytest.raises(DataError, match=r"line 1: field \"chosen\" must be a string"):
        read_preferences(path)


def test_preference_pairs_reject_another_records_completion():
    records = [{"prompt": f"q{i}", "completion": f"a{i % 3}"} for i in range(12)]
    pairs = preference_pairs(records, seed=1)
    assert pairs == preference_pairs(records, seed=1)
    for rec, pair in zip(records, pairs):
        assert pair["prompt"] == rec["prompt"] and pair["chosen"] == rec["completion"]
        assert pair["rejected"] != pair["chosen"]
        assert pair["rejected"] in {r["completion"] for r in records}
    with pytest.raises(DataError, match="two different completions"):
        preference_pairs([{"prompt": "q", "completion": "a"}] * 3)


def tiny_lora(seed=0, init_lora_weights=False):
    from conftest import tiny_model
    model = tiny_model(seed, vocab_size=300)
    return get_peft_model(model, LoraConfig(r=4, init_lora_weights=init_lora_weights,
                                            target_modules=["c_attn", "c_fc"]))


def synthetic(tok, n, seed=0):
    """Prompts of two colour words or two number words; the completion names the kind."""
    kinds = {" colour.": ["red", "green", "blue", "yellow"], " number.": ["one", "two", "three"]}
    rng = __import__("random").Random(seed)
    records = []
    for _ in range(n):
        answer = rng.choice(sorted(kinds))
        a, b = rng.choice(kinds[answer]), rng.choice(kinds[answer])
        records.append({"prompt": f"Question: {a} {b}?", "completion": answer})
    return encode_preferences(preference_pairs(records, seed), tok)


def test_reference_is_the_model_with_its_adapter_disabled(tok):
    """add_reference_logps on a LoRA model gives the base GPT's log-probabilities (the adapter
    is not a no-op here), without a second model; the adapter is on again afterwards."""
    model = tiny_lora()
    examples = synthetic(tok, 6)
    with_ref = add_reference_logps(model, examples, tok.eos_token_id, batch_size=4)
    base = model.get_base_model()
    batch = collate_preferences(examples, tok.eos_token_id)
    with model.disable_adapter():
        out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = sequence_logps(out.logits, batch["labels"]).double()
    got = torch.tensor([e["reference_chosen_logp"] for e in with_ref]
                       + [e["reference_rejected_logp"] for e in with_ref], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-4)
    batch = collate_preferences(with_ref, tok.eos_token_id)
    loss, cr, rr = dpo_batch_loss(model, batch, beta=0.1)
    assert (cr - rr).abs().max() > 1e-4                       # the adapter is active again
    assert model.training


def test_train_dpo_raises_held_out_reward_accuracy_and_logs_it(tok, tmp_path):
    """train(objective="dpo"): the chosen completions (the prompt's own: the kind of its
    words) come to beat the rejected ones (another prompt's) on held-out pairs; the reward
    accuracy and margin are in metrics.jsonl's eval lines, and the loss starts at log 2."""
    from conftest import cfg
    from minift.train import train
    torch.manual_seed(0)
    model = tiny_lora(init_lora_weights=True)       # B = 0: the policy starts at the reference
    train_pairs, val = synthetic(tok, 32, seed=0), synthetic(tok, 16, seed=1)
    seen = []
    result = train(model, train_pairs, val, cfg(objective="dpo", dpo_beta=0.1, lr=1e-2,
                                                max_steps=12, batch_size=8, eval_every=12,
                                                weight_decay=0.0, output_dir=str(tmp_path)),
                   callback=seen.append)
    assert abs(seen[0]["loss"] - math.log(2)) < 1e-6     # policy == reference at step 1
    [line] = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"eval"' in x]
    assert line["reward_accuracy"] > 0.6 and line["reward_margin"] > 0
    assert line["val_loss"] == result.best_val_loss < math.log(2) - 0.05
    again = preference_metrics(model, add_reference_logps(model, val, tok.eos_token_id),
                               tok.eos_token_id)
    assert abs(again["reward_accuracy"] - line["reward_accuracy"]) < 1e-9


def test_full_fine_tuning_reference_is_the_model_before_training(tok):
    """Without an adapter the reference log-probs are the starting model's, computed once
    before the first step (no frozen copy): the first step's loss is exactly log 2."""
    from conftest import cfg, tiny_model
    from minift.train import train
    model = tiny_model(0, vocab_size=300)
    seen = []
    train(model, synthetic(tok, 8), None, cfg(objective="dpo", max_steps=2, batch_size=4),
          callback=seen.append)
    assert abs(seen[0]["loss"] - math.log(2)) < 1e-6 and seen[1]["loss"] != seen[0]["loss"]
    from minift.config import TrainConfig
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="ppo")
    with pytest.raises(ValueError, match="dpo_beta"):
        TrainConfig(objective="dpo", dpo_beta=0)
    from minift.formats import DataError as E
    with pytest.raises(E, match="chosen_/rejected_"):
        train(model, [{"input_ids": [1, 2], "labels": [1, 2]}], None, cfg(objective="dpo"))


# ----------------------------------------------------------------------------- the command line
def run_main(capsys, *args):
    from minift.cli import main
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err, *fragments):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("minift: error: ") and "Traceback" not in err, err
    assert all(f in lines[-1] for f in fragments), lines[-1]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A random 2-layer, 32-wide GPT-2 with minift-tiny's vocabulary and tokenizer files: the
    built-in tasks tokenise as for minift-tiny, at a fraction of its cost."""
    import shutil
    from conftest import make_hf_gpt2
    from minift.checkpoint import resolve_source
    folder = tmp_path_factory.mktemp("small_model")
    make_hf_gpt2(folder, vocab_size=4096, n_positions=256, bos_token_id=0, eos_token_id=0)
    for f in resolve_source("minift-tiny").glob("*.json"):
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


def test_finetune_objective_dpo_on_the_preference_task(small_model, tmp_path, capsys):
    """`minift finetune --task preference --objective dpo`: report.json has reward_accuracy
    and reward_margin before (0: the policy is the reference) and after, per pair too."""
    from minift.tasks import get_task
    pairs = get_task("preference").records("validation")[:12]
    write_jsonl(tmp_path / "val.jsonl", pairs)
    write_jsonl(tmp_path / "train.jsonl", get_task("preference").records("train")[:16])
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "finetune", "--model", small_model, "--objective", "dpo",
                            "--data", tmp_path / "train.jsonl",
                            "--val-data", tmp_path / "val.jsonl",
                            "--max-steps", 4, "--batch-size", 4, "--lr", 5e-3, "--no-bf16",
                            "--no-forgetting", "--output-dir", out, "--loraplus-lr-ratio", 4)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["reward_accuracy"] == 0.0 and report["before"]["n"] == 12
    assert abs(report["before"]["val_loss"] - math.log(2)) < 1e-6
    assert len(report["item_scores"]["after"]["reward_accuracy"]) == 12
    assert report["after"]["reward_margin"] != 0.0
    table = (out / "report.md").read_text(encoding="utf-8")
    assert "validation DPO loss (per pair)" in table and "nats/token" not in table
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert "reward_accuracy" in evals[-1]
    assert abs(evals[-1]["reward_accuracy"] - report["after"]["reward_accuracy"]) < 1e-9


def test_dpo_command_line_errors_are_one_line(tmp_path, capsys):
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b"}])
    code, _, err = run_main(capsys, "finetune", "--objective", "dpo", "--data",
                            tmp_path / "bad.jsonl", "--output-dir", tmp_path / "r1")
    assert code == 1
    one_line_error(err, "bad.jsonl line 1", "missing \"rejected\"")
    code, _, err = run_main(capsys, "finetune", "--task", "preference", "--output-dir",
                            tmp_path / "r2")
    assert code != 0                             # (2: a usage error)
    one_line_error(err, "--objective dpo")
    code, _, err = run_main(capsys, "finetune", "--method", "prompt", "--use-dora",
                            "--output-dir", tmp_path / "r3")
    assert code != 0
    one_line_error(err, "--use-dora applies to --method lora, not prompt")


# ----------------------------------------------------------------------------- compare's DPO row
def hf_margins(model_dir, trained_dir, pairs, beta=0.1):
    """Reward margins recomputed with transformers and peft, pair by pair, in float64:
    beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))) over completion + eos, with
    ref the model in model_dir and pi the run's trained folder: adapter/ (PEFT over ref) or
    model/ (a whole Hugging Face folder, from full fine-tuning)."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    tok = Tokenizer.from_pretrained(model_dir)
    reference = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    if (Path(trained_dir) / "adapter_config.json").exists():
        policy = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(model_dir),
                                           trained_dir).eval()
    else:
        policy = GPT2LMHeadModel.from_pretrained(trained_dir).eval()

    def logp(model, prompt, completion):
        p, c = tok(prompt)["input_ids"], tok(completion)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0].double()
        lp = torch.log_softmax(logits[len(p) - 1:-1], dim=-1)           # predicts tokens len(p)..
        return lp.gather(1, torch.tensor(c)[:, None]).sum().item()

    def ratio(prompt, completion):
        return logp(policy, prompt, completion) - logp(reference, prompt, completion)

    return [beta * (ratio(r["prompt"], r["chosen"]) - ratio(r["prompt"], r["rejected"]))
            for r in pairs]


def compare_report(out):
    """report.json, and its table rows by method (compare_report.compare_rows: the cells
    report.md shows, which must be exactly the markdown of report.json)."""
    from minift.compare_report import compare_markdown, compare_rows
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text(encoding="utf-8") == compare_markdown(report)
    return report, {r["method"]: r for r in compare_rows(report)}


def test_compare_has_a_dpo_row_scored_on_the_preference_pairs(small_model, tmp_path, capsys):
    """`compare --methods lora,lora-dpo`: the DPO row trains on the built-in preference task;
    its reward accuracy is the transformers + peft recomputation's; it has no exact match
    (so no rank); its val loss is blank; the supervised row is ranked as before."""
    from minift.tasks import REFERENCE, get_task
    write_jsonl(tmp_path / "val.jsonl", get_task("params").records("validation")[:8])
    (tmp_path / "ref.txt").write_text(REFERENCE.read_text()[:2000])
    out = tmp_path / "cmp"
    code, stdout, err = run_main(
        capsys, "compare", "--methods", "lora,lora-dpo", "--model", small_model,
        "--max-steps", 4, "--eval-every", 4, "--eval-samples", 2, "--batch-size", 8,
        "--val-data", tmp_path / "val.jsonl", "--reference", tmp_path / "ref.txt",
        "--output-dir", out)
    assert code == 0, err
    report, cells = compare_report(out)
    lora, dpo = report["methods"]
    assert dpo["method"] == "lora-dpo" and dpo["objective"] == "dpo" and "objective" not in lora
    val = get_task("preference").records("validation")
    assert dpo["after"]["n"] == len(val) and "validation 96 pairs" in dpo["data_detail"]
    margins = hf_margins(small_model, out / "lora-dpo" / "adapter", val)
    # a pair whose margin is within rounding of 0 may take either sign in either stack (4
    # steps move few margins far from 0: 3 of the 96 are within 1e-5 here)
    sure = [i for i, m in enumerate(margins) if abs(m) > 1e-5]
    assert len(sure) >= 0.9 * len(val)
    ours = dpo["item_scores"]["after"]["reward_accuracy"]
    assert [ours[i] for i in sure] == [float(margins[i] > 0) for i in sure]
    assert dpo["after"]["reward_accuracy"] == sum(ours) / len(val)
    assert dpo["after"]["reward_margin"] == pytest.approx(sum(margins) / len(val), abs=1e-5)
    assert "change" in dpo["forgetting"]                # the same reference text, before/after
    cell = cells["lora-dpo"]
    assert cell["val loss"] == "-" and cell["exact match [95% CI]"] == "-"
    assert cell["vs best"] == "-" and cell["reward acc"] == f"{dpo['after']['reward_accuracy']:.3f}"
    assert cells["lora"]["vs best"] == "best" and "lora-dpo" in stdout


def test_compare_dpo_rows_alone_with_full_dpo(small_model, tmp_path, capsys):
    """`compare --task preference --methods lora-dpo,full-dpo`: the DPO-only path. Both rows
    are scored by the transformers (+ peft) recomputation from their saved weights (full-dpo
    from its whole model folder), the base model is the reference (margin 0 on every pair,
    so reward accuracy 0), the rows are ranked by reward accuracy, and no supervised metric
    appears anywhere."""
    from minift.tasks import REFERENCE, get_task
    (tmp_path / "ref.txt").write_text(REFERENCE.read_text()[:2000])
    val = get_task("preference").records("validation")[:12]
    write_jsonl(tmp_path / "val.jsonl", val)
    out = tmp_path / "cmp"
    code, stdout, err = run_main(
        capsys, "compare", "--task", "preference", "--methods", "lora-dpo,full-dpo",
        "--model", small_model, "--max-steps", 3, "--eval-every", 3, "--batch-size", 4,
        "--val-data", tmp_path / "val.jsonl", "--reference", tmp_path / "ref.txt",
        "--output-dir", out)
    assert code == 0, err
    report, cells = compare_report(out)
    rows = {m["method"]: m for m in report["methods"]}
    assert set(rows) == {"lora-dpo", "full-dpo"}
    for name, folder in (("lora-dpo", "adapter"), ("full-dpo", "model")):
        m = rows[name]
        assert m["objective"] == "dpo" and m["after"]["n"] == len(val)
        margins = hf_margins(small_model, out / name / folder, val)
        assert min(abs(x) for x in margins) > 1e-5                 # no sign up to rounding
        assert m["item_scores"]["after"]["reward_accuracy"] == [float(x > 0) for x in margins]
        assert m["after"]["reward_margin"] == pytest.approx(sum(margins) / len(val), abs=1e-5)
        assert "change" in m["forgetting"]
    assert rows["full-dpo"]["trainable_params"] > 10 * rows["lora-dpo"]["trainable_params"]
    cols = list(cells["lora-dpo"])
    assert "reward acc [95% CI]" in cols and not [c for c in cols if "exact match" in c]
    # the base model is the reference: nothing to score (its margins are 0 by definition)
    base = cells["base model (no training)"]
    assert {v for k, v in base.items() if k != "method"} <= {"0", "0%", "-"}
    acc = {n: rows[n]["after"]["reward_accuracy"] for n in rows}
    for n in rows:
        assert cells[n]["reward acc [95% CI]"].startswith(f"{acc[n]:.3f} [")
        assert cells[n]["val loss"] == "-"
    best, other = sorted(rows, key=lambda n: -acc[n])
    assert cells[best]["vs best"] == "best"
    assert cells[other]["vs best"] in ("best", "=", f"{acc[other] - acc[best]:+.3f}")


def test_compare_dpo_row_needs_preference_pairs(small_model, tmp_path, capsys):
    from minift.tasks import get_task
    code, _, err = run_main(capsys, "compare", "--methods", "lora,lora-dpo", "--model",
                            small_model, "--data", get_task("params").path("validation"),
                            "--output-dir", tmp_path / "c1")
    assert code == 1
    one_line_error(err, "lora-dpo trains on preference pairs", "validation.jsonl line 1",
                   "a 'completion' record; preference tuning needs")
    code, _, err = run_main(capsys, "compare", "--methods", "lora", "--task", "preference",
                            "--output-dir", tmp_path / "c2")
    assert code == 2
    one_line_error(err, "--task preference holds preference pairs", "lora-dpo")
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_finetune_of_preference_pairs_without_dpo_is_one_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    code, _, err = run_main(capsys, "finetune", "--data", path, "--output-dir", tmp_path / "r")
    assert code == 2
    one_line_error(err, "p.jsonl holds preference pairs", "train them with --objective dpo")
    assert not (tmp_path / "r").exists()


def test_eval_of_preference_pairs_is_one_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    code, _, err = run_main(capsys, "eval", "--data", path)
    assert code == 2
    one_line_error(err, "p.jsonl holds preference pairs", "--objective dpo")
