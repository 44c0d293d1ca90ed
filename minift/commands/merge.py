"""`minift merge`: fold a LoRA adapter into the weights, as a Hugging Face model folder."""
from __future__ import annotations

from pathlib import Path

from ..options import UsageError
from ..peft.model import CONFIG_NAME, adapter_folder, load_adapter_config
from .common import add_command, add_model_flags, load_for_inference

MERGE_EPILOG = """examples:
  minift merge --run runs/lora-20250101-120000 --out merged
  minift merge --model gpt2 --adapter my-lora --out gpt2-merged
The output is a Hugging Face folder (model + tokenizer) that transformers and minift load.
Only LoRA merges into the weights; other adapters are refused."""


def register(subparsers) -> None:
    p = add_command(subparsers, "merge", "fold a LoRA adapter into a full Hugging Face model "
                    "folder", MERGE_EPILOG, run)
    add_model_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a model in --out")


def run(args) -> int:
    out = Path(args.out)
    if args.run and (Path(args.run) / "model").is_dir():
        raise ValueError(f"{args.run} fine-tuned the model's own weights; its model/ folder is "
                         "already a full Hugging Face model, with nothing to merge")
    adapter = Path(args.run) / "adapter" if args.run else args.adapter and Path(args.adapter)
    if adapter is None:
        raise UsageError("merge needs --run RUN_DIR, or --model M --adapter DIR")
    if (adapter / CONFIG_NAME).is_file():  # refuse before loading anything
        kind = load_adapter_config(adapter_folder(adapter)).peft_type
        if kind != "LORA":
            raise ValueError(f"{adapter} holds a {kind} adapter; only LoRA folds into the "
                             "weights (the others add computation, so they stay adapters)")
    if (out / "config.json").exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a model; pass --overwrite to replace it")
    model, tok, *_ = load_for_inference(args)
    model.merge_and_unload().save_pretrained(out)
    tok.save_pretrained(out)
    print(f"merged {adapter} into the weights: {out} (a Hugging Face folder; GPT.from_pretrained "
          "and transformers' AutoModelForCausalLM load it)")
    return 0
