"""Pretrain minift-tiny, the embedded default model, on the Python standard library's own source.

Two stages, both with minift's own `train()`:
1. code: two passes over the corpus below (next-token prediction on real source);
2. copying: COPY_STEPS more steps on half code, half synthetic copying documents (lines of
   random identifiers written two or three times, and random token sequences repeated). A
   model this small, on ~12M tokens of code alone, never learns to copy from its context
   (the "induction heads" of Olsson et al. 2022, §2, form after far more text); stage 1
   leaves it at 0% top-1 on the second half of a repeated random sequence. Stage 2 makes
   copying a large share of the loss, and the heads form within a few hundred steps.

The corpus is every .py file of the standard library that scripts/stdlib_corpus.py's
`corpus_files()` keeps (code, comments, docstrings and the test suite; no file of a task
module) and the `pydoc_data.topics` language reference. Every HOLD_OUT_EVERY-th file is held
out, never trained on (not even by the tokenizer); the first REFERENCE_CHARS of them are
written to minift/assets/reference.txt, whose perplexity before and after fine-tuning
measures forgetting. The script trains a byte-level BPE tokenizer (minift.Tokenizer) on the
training files and a GPT-2 with minift's own `train()`, then writes a Hugging Face folder:

    python scripts/pretrain_tiny.py                          # the shipped model (2 CPU cores)
    python scripts/pretrain_tiny.py --resume                 # continue after a kill
    python scripts/pretrain_tiny.py --device cuda --tokens 1e8   # a larger budget on a GPU

Each file is followed by <|endoftext|> and the files are concatenated into one token stream,
cut into 256-token windows twice, at offsets 0 and 128, so the second pass sees every token
in another context. Checkpoints go to --run (train()'s run folder), so a killed run resumes
exactly. Deterministic for a given Python and torch: fixed file order, seeds, thread count.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import string
import time
from pathlib import Path

import pydoc_data.topics
import torch

from minift.evaluate import perplexity
from minift.machine import default_device
from minift.probes import copy_probe
from minift.model import GPT, GPTConfig
from minift.tokenizer import Tokenizer
from minift.config import TrainConfig
from minift.train import train
from stdlib_corpus import STDLIB, check_disjoint, corpus_files

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "minift" / "assets" / "minift-tiny"
REFERENCE = ROOT / "minift" / "assets" / "reference.txt"
HOLD_OUT_EVERY = 50        # every 50th file (2%) is held out
REFERENCE_CHARS = 40_000   # ~12k tokens: forgetting is measured in about a second
BLOCK = 256
COPY_STEPS = 3500          # stage 2


def documents() -> tuple[list[str], list[str], list[str]]:
    """(training documents, held-out documents, names of the held-out files)."""
    files = corpus_files()
    check_disjoint(files)
    train_docs = [pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics)]
    held, held_names = [], []
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            continue
        if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1:
            held.append(text)
            held_names.append(str(path.relative_to(STDLIB)))
        else:
            train_docs.append(text)
    return train_docs, held, held_names


def windows(stream: torch.Tensor) -> list[dict]:
    """256-token training examples from the stream, at offsets 0 and BLOCK // 2."""
    out = []
    for offset in (0, BLOCK // 2):
        n = (len(stream) - offset) // BLOCK
        for row in stream[offset:offset + n * BLOCK].view(n, BLOCK).tolist():
            out.append({"input_ids": row, "labels": row})
    return out


def copy_documents(tok, n_tokens: int, seed: int) -> list[int]:
    """A token stream of n_tokens synthetic copying documents, each followed by eos: half are
    a line of 4-16 random identifiers (random letters, or random lower-case words of the
    tokenizer's vocabulary) written three times with one separator, half a random sequence
    of 10-80 token ids repeated two or three times. Only copying predicts their repeats."""
    rng = random.Random(seed)
    words = sorted(w for w in tok.backend.get_vocab() if w.isalpha() and w.islower()
                   and 3 <= len(w) <= 8)

    def identifier() -> str:
        if rng.random() < 0.5:
            return "_".join("".join(rng.choice(string.ascii_lowercase)
                                    for _ in range(rng.randint(2, 6)))
                            for _ in range(rng.randint(1, 2)))
        return "_".join(rng.sample(words, rng.randint(1, 2)))

    stream: list[int] = []
    while len(stream) < n_tokens:
        if rng.random() < 0.5:
            names = list(dict.fromkeys(identifier() for _ in range(rng.randint(4, 16))))
            line = rng.choice([", ", " ", "\n", " | "]).join(names)
            stream += tok.encode("\n".join([line] * 3))
        else:
            seq = [rng.randrange(1, tok.vocab_size) for _ in range(rng.randint(10, 80))]
            stream += seq * rng.randint(2, 3)
        stream.append(tok.eos_token_id)
    return stream[:n_tokens]


def stage_config(args, run: Path, steps: int, lr: float, warmup: int) -> TrainConfig:
    resume = args.resume and (run / "run.json").exists()
    return TrainConfig(
        output_dir=str(run), resume=resume, overwrite=not resume, seed=args.seed,
        max_steps=steps, batch_size=args.batch_size, lr=lr, weight_decay=args.weight_decay,
        adam_betas=(0.9, 0.95), schedule="cosine", warmup_steps=warmup, dropout=0.0,
        eval_every=args.eval_every, save_every=250, log_every=50, keep_last=2,
        device=args.device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=float, default=None,
                   help="training tokens (default: both passes over the corpus, ~2 epochs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)   # a model this small tolerates a high lr
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--copy-steps", type=int, default=COPY_STEPS, help="stage 2's steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: CUDA if available, else the CPU")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "pretrain",
                   help="train()'s run folder for stage 1 (stage 2: the same name + -copying)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run")
    p.add_argument("--out", type=Path, default=MODEL_DIR)
    p.add_argument("--reference", type=Path, default=REFERENCE)
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # fixed, so the run is reproducible
    torch.manual_seed(args.seed)
    t0 = time.time()

    # 1. The text. The held-out slice is written first; nothing below sees it except
    #    the evaluations.
    train_docs, held, held_names = documents()
    reference_text, used = "", []
    for name, doc in zip(held_names, held):
        if len(reference_text) >= REFERENCE_CHARS:
            break
        reference_text += ("\n\n" if reference_text else "") + doc
        used.append(name)
    reference_text = reference_text[:REFERENCE_CHARS].rsplit("\n", 1)[0]
    args.reference.parent.mkdir(parents=True, exist_ok=True)
    args.reference.write_text(reference_text + "\n", encoding="utf-8")

    # 2. The tokenizer: GPT-2's byte-level BPE, trained on the training documents only.
    tok = Tokenizer.train_bpe(train_docs, vocab_size=args.vocab_size)
    tok.model_max_length = BLOCK

    # 3. Tokens: every document followed by eos, in one stream.
    eos = tok.eos_token_id
    stream = torch.tensor([t for ids in tok(train_docs)["input_ids"] for t in ids + [eos]])
    data = windows(stream)
    val = windows(torch.tensor(tok.encode("\n\n".join(held)) + [eos]))[: len(held) * 8]
    tokens = len(data) * BLOCK if args.tokens is None else int(args.tokens)
    steps = tokens // (args.batch_size * BLOCK)
    print(f"{len(train_docs)} training documents ({len(stream):,} tokens), {len(held)} held-out "
          f"files ({len(val)} validation windows); reference.txt {len(reference_text):,} chars "
          f"from {len(used)} files", flush=True)

    # 4. The model and its training, with minift's own loop.
    # gelu_pytorch_tanh: the fused tanh GELU that minift trains with under either name; under
    # this one transformers calls the same kernel, so its logits equal minift's exactly
    config = GPTConfig(activation_function="gelu_pytorch_tanh",
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       vocab_size=tok.vocab_size, n_positions=BLOCK, bos_token_id=eos,
                       eos_token_id=eos)
    model = GPT(config)
    print(f"model: {model.num_parameters():,} parameters; {steps} steps of "
          f"{args.batch_size} x {BLOCK} tokens", flush=True)
    result = train(model, data, val, stage_config(args, args.run, steps, args.lr, args.warmup))
    # Stage 2: copying. Half the windows are code (a seeded sample of stage 1's), half
    # synthetic copying documents; a lower peak lr, as for any continued pretraining.
    copy_run = args.run.with_name(args.run.name + "-copying")
    n_half = args.copy_steps * args.batch_size // 2
    code = random.Random(args.seed).sample(data, n_half)
    synthetic = copy_documents(tok, n_half * BLOCK, args.seed)
    mixed = code + [{"input_ids": w, "labels": w} for w in
                    (synthetic[i:i + BLOCK] for i in range(0, n_half * BLOCK, BLOCK))]
    result = train(model, mixed, val, stage_config(args, copy_run, args.copy_steps,
                                                   args.lr / 2, 50))
    model.to("cpu").eval()
    train_seconds = time.time() - t0

    # 5. The Hugging Face folder, and what it took to make it.
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    ref_ppl = perplexity(model, reference_text, tok, batch_size=16)
    history = [json.loads(line) for run in (args.run, copy_run)
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    try:
        copying = copy_probe(model, tok, n_trials=1000, seed=args.seed)["token_accuracy"]
    except ValueError as e:  # a small --vocab-size: a probe line longer than the context
        print(f"no copying probe: {e}", flush=True)
        copying = None
    report = dict(
        python=platform.python_version(), torch=torch.__version__, seed=args.seed,
        device=str(args.device or default_device()),
        threads=args.threads, corpus_files=len(train_docs) + len(held) - len(pydoc_data.topics.topics),
        train_documents=len(train_docs), train_tokens=len(stream), held_out_files=held_names,
        reference_files=used, reference_chars=len(reference_text),
        reference_tokens=len(tok.encode(reference_text)),
        parameters=model.num_parameters(), vocab_size=tok.vocab_size,
        config=dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd),
        steps=steps, copy_steps=args.copy_steps, batch_size=args.batch_size, block_size=BLOCK,
        tokens_seen=(steps + args.copy_steps) * args.batch_size * BLOCK, lr=args.lr,
        warmup=args.warmup, copy_token_accuracy=None if copying is None else round(copying, 4),
        weight_decay=args.weight_decay, total_seconds=round(train_seconds),
        val_loss=result.evals[-1]["val_loss"] if result.evals else None,
        reference_perplexity=round(ref_ppl, 2),
        evals=[h for h in history if h.get("event") == "eval"])
    (args.out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"done in {report['total_seconds']}s: reference perplexity {ref_ppl:.2f}; "
          f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
