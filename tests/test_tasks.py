"""The built-in tasks through the CLI's task code (minift.commands.taskdata): a multiple-choice
task scored against log-likelihoods from transformers' loss, and the error an unknown
--task gives."""
import pytest
import torch
from conftest import make_hf_gpt2

from minift import GPT, Tokenizer
from minift.cli import build_parser, main
from minift.commands.finetune import resolve_finetune
from minift.commands.taskdata import evaluate_model, load_task_data
from minift.tasks import TASKS, get_task


def hf_logprob(hf, context, continuation):
    """log p(continuation | context): minus transformers' mean loss over the continuation's
    tokens (the context's labels -100), times their count."""
    labels = [-100] * len(context) + continuation
    with torch.no_grad():
        loss = hf(torch.tensor([context + continuation]), labels=torch.tensor([labels])).loss
    return -float(loss) * len(continuation)


def test_task_choice_scores_the_likeliest_choice(tmp_path):
    tok = Tokenizer.from_pretrained("minift-tiny")
    hf = make_hf_gpt2(tmp_path, vocab_size=tok.vocab_size, n_positions=128)
    model = GPT.from_pretrained(tmp_path)
    opts = resolve_finetune(build_parser().parse_args(
        ["finetune", "--task", "choice", "--eval-samples", "5", "--no-forgetting"]))
    data = load_task_data(opts, tok, model.config.n_positions)
    test = get_task("choice").records("test")[:5]   # the first 5 test records are scored
    assert data.kind == "choice" and data.records == test

    metrics, answers, items = evaluate_model(model, tok, data, batch_size=2)

    hand = [[hf_logprob(hf, tok.encode(r["prompt"]), tok.encode(c)) for c in r["choices"]]
            for r in test]
    best = [max(range(len(h)), key=h.__getitem__) for h in hand]
    for h, b in zip(hand, best):   # no near-tie a rounding difference could flip
        assert all(h[b] - s > 1e-4 for i, s in enumerate(h) if i != b)
    correct = [float(b == r["label"]) for b, r in zip(best, test)]
    assert answers == [r["choices"][b] for b, r in zip(best, test)]
    assert items == {"accuracy": correct}
    assert metrics["accuracy"] == sum(correct) / 5 and metrics["n"] == 5
    assert "exact_match" not in metrics   # not scored as a generation task


def test_unknown_task_is_one_error_naming_it_and_the_known_ones(capsys):
    code = main(["finetune", "--task", "nosuch"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("minift: error: "), err
    assert "'nosuch'" in lines[0] and "Traceback" not in err
    for name in TASKS:
        assert name in lines[0], (name, lines[0])
    with pytest.raises(ValueError, match="unknown task 'nosuch'; the built-in tasks are "
                                         "params, call, choice, docstring, preference"):
        get_task("nosuch")


def test_an_empty_prompt_trains_but_is_not_a_test_prompt(tmp_path):
    """The README's pairs.jsonl: an empty prompt is a training example, but generation has no
    token to continue from, so the task metrics skip it (evaluate_generation refuses it)."""
    tok = Tokenizer.from_pretrained("minift-tiny")
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "2 + 2 =", "completion": " 4"}\n'
                    '{"prompt": "", "completion": "an empty prompt"}\n'
                    '{"prompt": "3 + 3 =", "completion": " 6"}\n')
    opts = resolve_finetune(build_parser().parse_args(
        ["finetune", "--data", str(path), "--val-data", str(path), "--no-forgetting"]))
    data = load_task_data(opts, tok, 128)
    assert len(data.train) == 3 and len(data.val) == 3
    assert [r["prompt"] for r in data.records] == ["2 + 2 =", "3 + 3 ="]


def test_eval_scores_the_prompts_it_can_continue(tmp_path, capsys):
    """`minift eval` on the same file: the empty prompt counts in the loss, not in the task
    metrics (it stopped with "prompt 2 is empty")."""
    import json
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "2 + 2 =", "completion": " 4"}\n'
                    '{"prompt": "", "completion": "an empty prompt"}\n')
    assert main(["eval", "--data", str(path), "--max-new-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 2 and result["task"]["n"] == 1
