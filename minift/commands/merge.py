"""`minift merge`: fold one LoRA adapter, or a weighted combination of several
(PeftModel.add_weighted_adapter), into the weights, as a Hugging Face model folder."""
from __future__ import annotations

from pathlib import Path

from ..model import GPT
from ..options import UsageError
from ..peft import PeftModel
from ..peft.files import CONFIG_NAME, adapter_folder, load_adapter_config
from ..peft.merge import COMBINATIONS
from ..tokenizer import Tokenizer
from .common import add_command, read_run_config

MERGE_EPILOG = """examples:
  minift merge --run runs/lora-20250101-120000 --out merged
  minift merge --model gpt2 --adapter my-lora --out gpt2-merged
  minift merge --run runs/a --run runs/b --weights 0.7,0.3 --out mix
The output is a Hugging Face folder (model + tokenizer) that transformers and minift load.
Only LoRA merges into the weights; other adapters are refused. Several adapters (one base
model) are combined first: "cat" (the default) adds the weighted updates exactly,
sum_i w_i * scaling_i * B_i A_i; "linear", "ties" (with --density) and "svd" are PEFT's
add_weighted_adapter."""


def register(subparsers) -> None:
    p = add_command(subparsers, "merge", "fold LoRA adapters into a full Hugging Face model "
                    "folder", MERGE_EPILOG, run)
    p.add_argument("--model", metavar="PATH", help="base model of --adapter: folder, cached hub "
                   "id or minift-tiny (default: minift-tiny)")
    p.add_argument("--adapter", metavar="DIR", action="append", help="adapter folder (PEFT "
                   "format); repeat for several")
    p.add_argument("--run", metavar="RUN_DIR", action="append", help="a LoRA finetune run; "
                   "repeat for several (one base model)")
    p.add_argument("--weights", metavar="W1,W2,...", help="one weight per adapter, in order "
                   "(default: 1 each)")
    p.add_argument("--combination-type", default="cat", choices=COMBINATIONS,
                   help="how several adapters combine (default: cat)")
    p.add_argument("--density", type=float, metavar="X", help="ties: the share of each "
                   "update's entries kept")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a model in --out")


def _adapters(args) -> tuple[str, list[Path]]:
    """(base model, adapter folders) from --run folders or --model + --adapter."""
    if args.run and (args.model or args.adapter):
        raise UsageError("--run names the model and adapter already; drop --model/--adapter")
    if not args.run:
        if not args.adapter:
            raise UsageError("merge needs --run RUN_DIR, or --model M --adapter DIR")
        return args.model or "minift-tiny", [Path(a) for a in args.adapter]
    bases = []
    for r in map(Path, args.run):
        if (r / "model").is_dir():
            raise ValueError(f"{r} fine-tuned the model's own weights; its model/ folder is "
                             "already a full Hugging Face model, with nothing to merge")
        bases.append(read_run_config(r)["model"])
        if not (r / "adapter").is_dir():
            raise FileNotFoundError(f"{r}: no adapter/ folder yet (training did not finish); "
                                    f"continue it with: minift finetune --resume {r}")
    if len(set(bases)) > 1:
        raise ValueError(f"the runs fine-tuned different base models {sorted(set(bases))}; "
                         "adapters combine only on one base")
    return bases[0], [Path(r) / "adapter" for r in args.run]


def _weights(args, n: int) -> list[float]:
    if args.weights is None:
        return [1.0] * n
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise UsageError(f"--weights {args.weights!r}: expected numbers separated by commas, "
                         "e.g. 0.7,0.3") from None
    if len(weights) != n:
        raise UsageError(f"--weights has {len(weights)} values for {n} adapters; give one "
                         "weight per --run / --adapter, in order")
    return weights


def run(args) -> int:
    out = Path(args.out)
    base, adapters = _adapters(args)
    weights = _weights(args, len(adapters))
    for adapter in adapters:   # refuse before loading anything
        if (adapter / CONFIG_NAME).is_file():
            kind = load_adapter_config(adapter_folder(adapter)).peft_type
            if kind != "LORA":
                raise ValueError(f"{adapter} holds a {kind} adapter; only LoRA folds into the "
                                 "weights (the others add computation, so they stay adapters)")
    if (out / "config.json").exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a model; pass --overwrite to replace it")
    has_tokenizer = any((adapters[0] / f).is_file() for f in ("tokenizer.json", "vocab.json"))
    tok = Tokenizer.from_pretrained(adapters[0] if has_tokenizer else base)
    model = PeftModel.from_pretrained(GPT.from_pretrained(base), adapters[0], adapter_name="0")
    for i, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(adapter, adapter_name=str(i))
    if len(adapters) > 1 or args.weights is not None:
        model.add_weighted_adapter([str(i) for i in range(len(adapters))], weights, "merged",
                                   combination_type=args.combination_type, density=args.density)
        model.set_adapter("merged")
    model.merge_and_unload().save_pretrained(out)
    tok.save_pretrained(out)
    what = ", ".join(f"{w:g} x {a}" for w, a in zip(weights, adapters))
    print(f"merged {what} into the weights: {out} (a Hugging Face folder; GPT.from_pretrained "
          "and transformers' AutoModelForCausalLM load it)")
    return 0
