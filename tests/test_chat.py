"""minift.chat against transformers' apply_chat_template: rendering, token ids and the
assistant-token mask, on tiny tokenizer folders carrying real-style templates."""
import json
import sys

import pytest

from minift import chat
from minift.chat import BUILTIN_CHAT_TEMPLATE, chat_examples, end_of_turn_id, prompt_ids, render
from minift.data import IGNORE_INDEX, DataError, load_dataset
from minift.tokenizer import EOS, Tokenizer

pytest.importorskip("jinja2")

# ChatML (Qwen, many others): no {% generation %} tag, so spans come from turn-by-turn renders
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# ChatML with the {% generation %} markers transformers' own tests use
CHATML_MARKED = ("{% for message in messages %}{% if message['role'] != 'assistant' %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
                 "{% else %}{{'<|im_start|>assistant\n'}}{% generation %}"
                 "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-2 style: a default system prompt unless the conversation brings one; multi-line, so
# trim_blocks / lstrip_blocks matter; bos and eos from the special tokens
LLAMA = """{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{ bos_token }}<<SYS>>
{{ system }}
<</SYS>>

{% for message in loop_messages %}
    {% if message['role'] == 'user' %}
[INST] {{ message['content'] | trim }} [/INST]
    {% elif message['role'] == 'assistant' %}
 {{ message['content'] | trim }} {{ eos_token }}
    {% else %}
        {{ raise_exception('Only user and assistant roles are supported!') }}
    {% endif %}
{% endfor %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And café × 3? 🙂"},
     {"role": "assistant", "content": "Twelve, naïvely: 12.\nDone."},
     {"role": "user", "content": "thanks"}],
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": " Sure, "},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "OK!"}],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> folder: one tiny BPE (with ChatML's special tokens) under each template."""
    corpus = [json.dumps(c) for c in CONVERSATIONS] * 20 + ["### User: Assistant: [INST]"] * 5
    out = {}
    for name, template in (("chatml", CHATML), ("marked", CHATML_MARKED), ("llama", LLAMA),
                           ("builtin", BUILTIN_CHAT_TEMPLATE), ("none", None)):
        tok = Tokenizer.train_bpe(corpus, vocab_size=400)
        tok.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        tok.chat_template = template
        folder = tmp_path_factory.mktemp(name)
        tok.save_pretrained(folder)
        out[name] = folder
    return out


def hf(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["chatml", "llama", "marked", "builtin"])
def test_rendering_and_ids_match_transformers(folders, name):
    ours, ref = Tokenizer.from_pretrained(folders[name]), hf(folders[name])
    assert ours.chat_template == ref.chat_template
    for conv in CONVERSATIONS:
        for prefix in (conv, conv[:1]):
            for agp in (False, True):
                expected = ref.apply_chat_template(prefix, tokenize=False, add_generation_prompt=agp)
                assert render(ours, prefix, add_generation_prompt=agp)[0] == expected
        ids = ref.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert chat_examples(ours, [conv], ["x"])[0]["input_ids"] == ids
    # the built-in template, rendered in Python, is the same as transformers on its Jinja text
    if name == "builtin":
        none = Tokenizer.from_pretrained(folders["none"])
        assert none.chat_template is None
        assert [render(none, c) for c in CONVERSATIONS] == [render(ours, c) for c in CONVERSATIONS]


@pytest.mark.parametrize("name", ["marked", "builtin", "chatml"])
def test_assistant_mask_matches_transformers_token_for_token(folders, name):
    """The mask of a template with {% generation %} markers (transformers computes it), and
    of plain ChatML, whose turn-by-turn spans must give the marked template's mask."""
    ref_folder = folders["marked" if name == "chatml" else name]
    ours, ref = Tokenizer.from_pretrained(folders[name]), hf(ref_folder)
    first_turns = [c[:1 + next(i for i, m in enumerate(c) if m["role"] == "assistant")]
                   for c in CONVERSATIONS]
    for conv in CONVERSATIONS + first_turns:
        out = ref.apply_chat_template(conv, return_assistant_tokens_mask=True, return_dict=True)
        ex = chat_examples(ours, [conv], ["x"])[0]
        assert ex["input_ids"] == out["input_ids"]
        assert [int(t != IGNORE_INDEX) for t in ex["labels"]] == out["assistant_masks"]
        assert sum(out["assistant_masks"]) > 0


def test_a_transformers_tokenizer_gives_the_same_examples(folders):
    """chat_examples takes transformers' tokenizers too (offsets from return_offsets_mapping)."""
    for name in ("chatml", "marked", "builtin"):
        ours, ref = Tokenizer.from_pretrained(folders[name]), hf(folders[name])
        assert chat_examples(ref, CONVERSATIONS, ["x"] * 3) == \
            chat_examples(ours, CONVERSATIONS, ["x"] * 3)
        assert end_of_turn_id(ref) == end_of_turn_id(ours)


def labelled_runs(ex):
    runs, run = [], []
    for t in ex["labels"] + [IGNORE_INDEX]:
        if t == IGNORE_INDEX:
            if run:
                runs.append(run)
            run = []
        else:
            run.append(t)
    return runs


@pytest.mark.parametrize("name, end", [("chatml", "<|im_end|>"), ("none", EOS), ("llama", EOS)])
def test_labelled_tokens_are_the_assistant_turns_and_their_end_token(folders, name, end):
    tok = Tokenizer.from_pretrained(folders[name])
    examples = chat_examples(tok, CONVERSATIONS, ["x"] * 3)
    for conv, ex in zip(CONVERSATIONS, examples):
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        if name == "none":     # the built-in template strips contents
            replies = [r.strip() for r in replies]
        if name == "llama":    # this template writes " {content} {eos}"
            replies = [f" {r.strip()} " for r in replies]
        assert [tok.decode(r) for r in labelled_runs(ex)] == [r + end for r in replies]
        assert all(r[-1] == tok.token_to_id(end) for r in labelled_runs(ex))
        assert all(i == l for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX)
    assert tok.decode([end_of_turn_id(tok)]) == end


@pytest.mark.parametrize("name", ["chatml", "none", "llama"])
def test_generation_prompt_is_the_training_prefix(folders, name):
    """Generation sees exactly the tokens training saw before each assistant turn."""
    tok = Tokenizer.from_pretrained(folders[name])
    for conv in CONVERSATIONS:
        ex = chat_examples(tok, [conv], ["x"])[0]
        starts = [i for i, l in enumerate(ex["labels"])
                  if l != IGNORE_INDEX and (i == 0 or ex["labels"][i - 1] == IGNORE_INDEX)]
        turns = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        for start, turn in zip(starts, turns):
            prompt = prompt_ids(tok, conv[:turn])
            assert ex["input_ids"][:len(prompt)] == prompt and len(prompt) <= start + 1


def test_chat_jsonl_truncation_and_errors(folders, tmp_path):
    tok = Tokenizer.from_pretrained(folders["chatml"])
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS) + "\n")
    full = load_dataset(path, tok)
    assert full == chat_examples(tok, CONVERSATIONS, ["x"] * 3)
    short = load_dataset(path, tok, max_length=30)
    assert all(len(e["input_ids"]) <= 30 and e["input_ids"] == f["input_ids"][:30]
               and e["labels"] == f["labels"][:30] for e, f in zip(short, full))
    assert max(len(f["input_ids"]) for f in full) > 30
    first = next(i for i, t in enumerate(full[1]["labels"]) if t != IGNORE_INDEX)
    with pytest.raises(DataError, match=rf"chat.jsonl line 2: the first assistant token is at "
                                        rf"position {first}, beyond max_length"):
        load_dataset(path, tok, max_length=first)

    def refused(template, message, conv=CONVERSATIONS[0]):
        tok.chat_template = template
        with pytest.raises(DataError, match=message):
            chat_examples(tok, [conv], ["chat.jsonl line 7"])

    refused(CHATML.replace("'<|im_end|>'", "'.'"), r"line 7: the chat template writes no "
                                                   r"end-of-turn token")
    refused("{% for m in messages %}{{ m['content'] }", r"line 7: the chat template does not parse")
    refused(LLAMA, r"line 7: the chat template failed: Only user and assistant",
            [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}])
    refused("{{ messages[0]['content'] + 1 }}", r"line 7: the chat template failed: TypeError")
    refused("{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}Q{% endif %}", "not a prefix")
    tok.chat_template = None
    with pytest.raises(DataError, match="line 7: message 0: the built-in chat template knows"):
        chat_examples(tok, [[{"role": "tool", "content": "x"}]], ["line 7"])


def test_jinja2_is_only_imported_for_a_template(folders, monkeypatch):
    chat._compile.cache_clear()
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if it were not installed
    builtin = Tokenizer.from_pretrained(folders["none"])
    assert chat_examples(builtin, CONVERSATIONS[:1], ["x"])  # Python, no jinja2
    with pytest.raises(ImportError, match=r"pip install 'minift\[chat\]'"):
        chat_examples(Tokenizer.from_pretrained(folders["chatml"]), CONVERSATIONS[:1], ["x"])
    chat._compile.cache_clear()


def test_chat_template_round_trips_through_folders(folders, tmp_path):
    tok = Tokenizer.from_pretrained(folders["chatml"])
    assert tok.chat_template == CHATML
    tok.save_pretrained(tmp_path / "again")
    assert Tokenizer.from_pretrained(tmp_path / "again").chat_template == CHATML
    (tmp_path / "again" / "chat_template.jinja").write_text(LLAMA)  # transformers 5's file wins
    assert Tokenizer.from_pretrained(tmp_path / "again").chat_template == LLAMA
    (tmp_path / "again" / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"},
                               {"name": "default", "template": CHATML_MARKED}]
    (tmp_path / "again" / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(tmp_path / "again").chat_template == CHATML_MARKED
    config["chat_template"] = 3
    (tmp_path / "again" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer_config.json: chat_template must be"):
        Tokenizer.from_pretrained(tmp_path / "again")


def test_chat_test_sets_score_the_last_assistant_turn(folders):
    """evaluate_generation on chat records = on the prompt/completion pairs they stand for:
    the conversation before the last assistant turn (as generation renders it) and that
    turn's content; generation stops at the template's end-of-turn token."""
    import torch

    from conftest import tiny_model
    from minift.evaluate import evaluate_generation, generate_completions, samples
    from minift.metrics import task_metrics
    tok = Tokenizer.from_pretrained(folders["chatml"])
    records = [{"messages": c} for c in CONVERSATIONS]
    pairs = []
    for conv in CONVERSATIONS:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        pairs.append({"prompt": render(tok, conv[:last], add_generation_prompt=True)[0],
                      "completion": conv[last]["content"]})
        assert tok.encode(pairs[-1]["prompt"]) == prompt_ids(tok, conv[:last])
    assert pairs[1]["completion"] == "Twelve, naïvely: 12.\nDone."
    model = tiny_model(vocab_size=len(tok), n_positions=128)
    torch.manual_seed(0)
    with torch.no_grad():  # make <|im_end|> likely somewhere, so stopping matters
        model.lm_head.weight[tok.token_to_id("<|im_end|>")] *= 40
    stop = tok.token_to_id("<|im_end|>")
    assert end_of_turn_id(tok) == stop != tok.eos_token_id
    preds = generate_completions(model, tok, [p["prompt"] for p in pairs], 12, eos_token_id=stop)
    rows = samples(model, tok, records, n=3, max_new_tokens=12)
    assert [r["generation"] for r in rows] == preds
    assert [r["reference"] for r in rows] == [p["completion"] for p in pairs]
    assert evaluate_generation(model, tok, records, 12) == task_metrics(
        [p.split("\n", 1)[0] for p in preds], [p["completion"] for p in pairs])


def test_chat_and_instruction_examples_pack_exactly(folders, tmp_path):
    """Packed rows (minift.packing) of chat and instruction examples give the loss and the
    gradients of the padded batch."""
    import torch

    from conftest import tiny_model
    from minift.data import collate
    from minift.packing import collate_packed
    tok = Tokenizer.from_pretrained(folders["none"])
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "input": "politely", "output": "Hi!"})
                    + "\n" + json.dumps({"instruction": "Add 2 and 2.", "output": "4"}) + "\n")
    examples = chat_examples(tok, CONVERSATIONS, ["x"] * 3) + load_dataset(path, tok)
    model = tiny_model(vocab_size=len(tok), n_positions=128)
    results = []
    for batch in (collate(examples, tok.eos_token_id), collate_packed(examples, tok.eos_token_id,
                                                                      row_length=128)):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (padded, g_padded), (packed, g_packed) = results
    assert collate_packed(examples, tok.eos_token_id, row_length=128)["input_ids"].shape[0] < 5
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the CLI
def arithmetic_chats(n):
    return [{"messages": [{"role": "system", "content": "You add numbers."},
                          {"role": "user", "content": f"What is {i} plus {i + 1}?"},
                          {"role": "assistant", "content": f"{2 * i + 1}."}]} for i in range(n)]


def test_cli_finetune_on_chat_data_then_generate_chat(tmp_path, capsys, monkeypatch):
    """`minift finetune --data chat.jsonl` on the embedded model: the run's report shows chat
    samples (the rendered conversation, the last assistant turn as reference); its tokenizer
    carries the built-in template; `minift generate --run DIR --chat` answers with the same
    template as a direct greedy decode of chat.prompt_ids."""
    import io

    import torch

    from minift.cli import main
    from minift.model import GPT
    from minift.peft import PeftModel
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_chats(24)))
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(path), "--max-steps", "3", "--eval-every", "3",
                 "--batch-size", "4", "--eval-samples", "2", "--num-samples", "2",
                 "--max-new-tokens", "6", "--no-forgetting", "--no-eval-before",
                 "--threads", "1", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    (first, _) = report["samples"]
    assert first["prompt"].startswith("### System:\nYou add numbers.\n\n### User:\nWhat is ")
    assert first["prompt"].endswith("\n\n### Assistant:\n")
    assert first["reference"] == next(r["messages"][2]["content"] for r in arithmetic_chats(24)
                                      if r["messages"][1]["content"] in first["prompt"])
    markdown = (out / "report.md").read_text()   # the samples table, newlines shown as \\n
    assert "| ### System:\\nYou add numbers.\\n\\n### User:\\nWhat is " in markdown
    tok = Tokenizer.from_pretrained(out / "adapter")
    assert tok.chat_template == BUILTIN_CHAT_TEMPLATE

    model = PeftModel.from_pretrained(GPT.from_pretrained("minift-tiny"), out / "adapter").eval()
    message = [{"role": "user", "content": "What is 2 plus 3?"}]
    ids = prompt_ids(tok, message)
    new = model.generate(torch.tensor([ids]), max_new_tokens=6, eos_token_id=tok.eos_token_id,
                         do_sample=True, seed=3)  # sampled: 3 steps leave greedy answers empty
    new = new[0, len(ids):].tolist()
    expected = tok.decode(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new
                          else new).strip()
    assert expected
    run = ["generate", "--run", str(out), "--chat", "--max-new-tokens", "6", "--do-sample",
           "--seed", "3"]
    assert main([*run, "--prompt", "What is 2 plus 3?"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal("What is 2 plus 3?\n\nthanks\n"))
    assert main(run) == 0
    shown = capsys.readouterr().out       # input() writes its "you> " prompt to stdout too
    assert shown.startswith(f"you> model> {expected}\n")
    assert shown.count("model> ") == 2    # the blank line is skipped; Ctrl-D (EOF) ends
    monkeypatch.setattr("sys.stdin", io.StringIO("not a terminal\n"))
    assert main(run) == 2
    assert "reads turns from a terminal" in capsys.readouterr().err


def test_cli_fields_maps_csv_columns(tmp_path, capsys):
    from minift.cli import main
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\n" + "".join(f"What is {i} plus {i}?, {2 * i}\n"
                                                  for i in range(20)))
    out = tmp_path / "run"
    args = ["finetune", "--data", str(path), "--max-steps", "1", "--eval-every", "1",
            "--batch-size", "4", "--eval-samples", "2", "--num-samples", "1",
            "--max-new-tokens", "4", "--no-forgetting", "--no-eval-before", "--threads", "1"]
    assert main([*args, "--fields", "prompt=question,completion=answer",
                 "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["samples"][0]["prompt"].startswith("What is ")
    capsys.readouterr()
    assert main([*args, "--output-dir", str(tmp_path / "run2")]) == 1
    err = capsys.readouterr().err
    assert "qa.csv row 1: expected {\"text\"}" in err and "--fields" in err
    assert "Traceback" not in err
