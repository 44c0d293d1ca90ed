"""The options of `minift finetune`: what can be configured, and how values are parsed and checked.

Each option is an `Opt`, the flag --name-with-dashes and the config key `name`. RUN_OPTIONS
(model, data, evaluation, method) are written out below; TRAIN_OPTIONS are generated from
TrainConfig, a flag per field with its `help` metadata (config.py), so the two never drift.

Options come in three layers, later ones winning:

    defaults(method)             Opt's and TrainConfig's, then RECIPE and METHOD_DEFAULTS
    read_config_file(path)       a --config file: TOML or JSON, keys = option names
    convert(opt, value, where)   the command line (each flag's text)

commands/finetune.py makes the flags and stacks the layers (`resolve_finetune`). The
resolved options are saved as config.json in the run folder: `--config` on it repeats the
run, `--resume` continues it. A wrong key or value raises `UsageError` naming where it came from (exit code 2).
"""
from __future__ import annotations

import difflib
import json
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from .config import TrainConfig
from .machine import default_device, device_problem
from .tasks import DEFAULT_TASK, TASKS

METHODS = {
    "lora": "LoRA, low-rank updates of linear layers (Hu et al. 2021)",
    "full": "full fine-tuning, every weight",
    "partial": "partial fine-tuning, the top k blocks and the final LayerNorm",
    "adapter": "Houlsby bottleneck adapters after attention and MLP (Houlsby et al. 2019)",
    "prefix": "prefix tuning, trained keys/values at every layer (Li & Liang 2021)",
    "prompt": "prompt tuning, trained input embeddings (Lester et al. 2021)",
    "ptuning": "P-tuning, input embeddings from a prompt-encoder MLP (Liu et al. 2021)",
}
VIRTUAL = ("prefix", "prompt", "ptuning")  # methods whose virtual tokens take context room
# The CLI's training defaults over TrainConfig's: a short run on a CPU (the README gives the
# measured time): 300 steps of 16 examples, about 7 epochs of the params task, ending with its
# best evaluation's weights; the model's own dropout off (GPT-2's 0.1 on attention, residual
# and embeddings): on minift-tiny it cost the default LoRA job validation loss on the params
# and call tasks (0.2297 -> 0.2057 and 0.2451 -> 0.1811 without it; call's exact match 0.54
# -> 0.85); the base model's copying is what these tasks need, and a 4-layer model has
# little of it to spare to noise. --dropout puts it back. LoRA's own dropout (on its
# branch's input, 0.05 in Opt below) is off too, for the same reason: validation loss
# 0.2057 -> 0.1979 on params, 0.1811 -> 0.1707 on call. Chosen on validation loss, not on
# the test split (the README has the table).
RECIPE = dict(max_steps=300, batch_size=16, eval_every=50, warmup_steps=20, restore_best=True,
              dropout=0.0)
# Per method: a learning rate that worked on the built-in task (LoRA: r 8/16/32 x lr 2e-3/
# 3e-3/5e-3 on the params task gave exact match 0.59-0.64, r=16 at 3e-3 0.63), and
# LoRA on every linear layer, which learns the task much better than PEFT's attention-only
# default here (as Dettmers et al. 2023, QLoRA §4, found on larger models).
# Packing (exact: packing.py) is on wherever the model sees each example alone; the
# virtual tokens of prefix, prompt and ptuning would lead only a row's first example.
METHOD_DEFAULTS = {
    "lora": dict(lr=3e-3, r=16, target_modules=["c_attn", "c_proj", "c_fc"], packing=True,
                 lora_dropout=0.0),
    "full": dict(lr=1e-3, packing=True), "partial": dict(lr=5e-4, packing=True),
    "adapter": dict(lr=3e-3, packing=True),
    "prefix": dict(lr=3e-2), "prompt": dict(lr=3e-2), "ptuning": dict(lr=3e-3),
}
MANAGED = {"output_dir", "resume", "overwrite"}  # TrainConfig fields the CLI sets itself


class UsageError(Exception):
    """A wrong option, on the command line or in a config file: exit code 2."""


@dataclass
class Opt:
    """One option of `finetune`: the flag --name-with-dashes and the config key `name`."""
    name: str
    kind: str                  # "int", "float", "str", "bool", "list" (comma-separated), "pair"
    default: object
    help: str
    optional: bool = False     # "none" gives None
    choices: tuple = ()
    methods: tuple = ()        # the methods it applies to; () = all
    metavar: str | None = None
    minimum: int | None = None  # the smallest value an int option takes (None: any)


def convert(opt: Opt, value, where: str):
    """A value from the command line (a string) or a config file (a TOML/JSON value) ->
    the option's type. Raises UsageError naming `where`."""
    if opt.optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    if isinstance(value, str) and opt.kind != "str":  # command-line text
        try:
            value = {"int": int, "float": float, "bool": _parse_bool,
                     "list": lambda s: [v.strip() for v in s.split(",") if v.strip()],
                     "pair": lambda s: [float(v) for v in s.replace(",", " ").split()],
                     }[opt.kind](value)
        except ValueError:
            raise UsageError(f"{where}: expected {_kind_name(opt)}, got {value!r}") from None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"int": number and isinstance(value, int), "float": number,
          "str": isinstance(value, str), "bool": isinstance(value, bool),
          "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
          "pair": isinstance(value, (list, tuple)) and len(value) == 2 and all(
              isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)}[opt.kind]
    if not ok:
        raise UsageError(f"{where}: expected {_kind_name(opt)}, got {value!r}")
    if opt.kind == "float":
        value = float(value)
    elif opt.kind == "pair":
        value = (float(value[0]), float(value[1]))
    if opt.choices and value not in opt.choices:
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(opt.choices)}")
    if opt.minimum is not None and value < opt.minimum:
        raise UsageError(f"{where}: must be at least {opt.minimum}"
                         + (" (or none)" if opt.optional else "") + f", got {value!r}")
    return value


def cli_device(value: str | None, present: bool = True) -> str:
    """--device: its value, or the default device; a name torch cannot read, or (with
    present) a device this machine lacks, is a UsageError naming --device and what is here."""
    if value is None:
        return default_device()
    problem = device_problem(value, present)
    if problem is not None:
        raise UsageError(f"--device {problem}, got {value!r}")
    return value


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "on", "1"):
        return True
    if text.lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError(text)


def _kind_name(opt: Opt) -> str:
    name = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "list": "comma-separated names", "pair": "two numbers"}[opt.kind]
    return name + (" or none" if opt.optional else "")


def _type_kind(name: str, hint) -> tuple[str, bool]:
    """A type annotation -> (kind, optional); e.g. `int | None` -> ("int", True)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    if typing.get_origin(hint) is tuple and all(a in (int, float) for a in typing.get_args(hint)):
        return "pair", optional
    if hint is list or typing.get_origin(hint) is list:   # report_to: comma-separated names
        return "list", optional
    kinds = {bool: "bool", int: "int", float: "float", str: "str"}
    if hint not in kinds:
        raise TypeError(f"minift finetune has no command-line form for TrainConfig.{name}: {hint}")
    return kinds[hint], optional


def train_options() -> list[Opt]:
    """One Opt per TrainConfig field (but MANAGED), with the field's help metadata."""
    hints = typing.get_type_hints(TrainConfig)
    opts = []
    for f in fields(TrainConfig):
        if f.name not in MANAGED:
            kind, optional = _type_kind(f.name, hints[f.name])
            default = f.default if f.default is not MISSING else f.default_factory()
            opts.append(Opt(f.name, kind, default, f.metadata.get("help", f"TrainConfig.{f.name}"),
                            optional))
    return opts


RUN_OPTIONS = [
    Opt("model", "str", "minift-tiny", "a Hugging Face GPT-2 folder, a hub id in the local "
        "Hugging Face cache, or minift-tiny (embedded)", metavar="PATH"),
    Opt("task", "str", DEFAULT_TASK, "the built-in task to train on when there is no --data "
        "(see `minift tasks`)", choices=tuple(TASKS)),
    Opt("data", "str", None, "training data: .txt (packed), or records in .jsonl, .csv, .tsv, "
        ".parquet, .arrow, a saved datasets folder or a cached dataset id: {\"text\"}, "
        "{\"prompt\", \"completion\"}, {\"instruction\", \"input\", \"output\"}, "
        "{\"messages\"} (chat), or with --objective dpo {\"prompt\", \"chosen\", "
        "\"rejected\"} pairs; none = the built-in --task", True, metavar="FILE"),
    Opt("val_data", "str", None, "validation data; none = the built-in task's validation split, "
        "or --val-fraction of --data", True, metavar="FILE"),
    Opt("test_data", "str", None, "prompts for the task metrics; none = the built-in task's test "
        "split, or the validation data", True, metavar="FILE"),
    Opt("fields", "str", None, "the data's column names for minift's fields, e.g. "
        "prompt=question,completion=answer (fields: text, prompt, completion, instruction, "
        "input, output, messages, chosen, rejected); none = the names as they are", True, metavar="FIELD=COL,..."),
    Opt("val_fraction", "float", 0.1, "share of --data held out for validation when there is no "
        "--val-data (seeded by --seed)"),
    Opt("forgetting", "bool", True, "perplexity on --reference before and after training "
        "(catastrophic forgetting)"),
    Opt("reference", "str", None, "pre-training-like text for forgetting and EWC's Fisher; none "
        "= the built-in reference.txt (minift-tiny's held-out pre-training text)", True,
        metavar="FILE"),
    Opt("eval_samples", "int", None, "task metrics on the first N prompts of the test data (a "
        "subset, for speed); none = all of them", True, minimum=1),
    Opt("max_new_tokens", "int", None, "generation length for the task metrics and samples; "
        "none = the built-in task's (room for its longest answer), 48 for --data", True,
        minimum=1),
    Opt("num_samples", "int", 4, "before/after generations to print and report", minimum=0),
    Opt("eval_before", "bool", True, "evaluate the base model before training"),
    Opt("threads", "int", None, "CPU threads of this process (torch.set_num_threads); none = "
        "1 for models under 10M parameters (their small matrices gain little from more threads "
        "and lose much on a busy machine), else torch's default; OMP_NUM_THREADS wins", True,
        minimum=1),
    Opt("output_dir", "str", None, "the run folder; none = runs/<method>-<date>-<time>", True,
        metavar="DIR"),
    Opt("method", "str", "lora", "what to train: " + ", ".join(METHODS), choices=tuple(METHODS)),
    Opt("r", "int", 8, "LoRA rank", methods=("lora",)),
    Opt("lora_alpha", "float", 16.0, "LoRA scale: the update is multiplied by lora_alpha / r",
        methods=("lora",)),
    Opt("lora_dropout", "float", 0.05, "dropout on the LoRA branch's input", methods=("lora",)),
    Opt("use_dora", "bool", False, "DoRA: LoRA plus a trained magnitude per output feature "
        "(Liu et al. 2024)", methods=("lora",)),
    Opt("target_modules", "list", None, "linear layers to adapt, comma-separated, matched by "
        "name suffix (c_attn, c_proj = attn.c_proj and mlp.c_proj, c_fc); none = the library's "
        "default (lora c_attn, adapter attn.c_proj,mlp.c_proj)", True, methods=("lora", "adapter")),
    Opt("bottleneck_size", "int", 32, "Houlsby adapter width m (each adapter adds 2 m d + d + m "
        "parameters)", methods=("adapter",)),
    Opt("num_virtual_tokens", "int", 20, "virtual tokens (prompt or prefix length)",
        methods=VIRTUAL),
    Opt("prefix_projection", "bool", False, "prefix tuning through a tanh MLP (Li & Liang §4.3)",
        methods=("prefix",)),
    Opt("encoder_hidden_size", "int", None, "width of the P-tuning encoder / prefix projection; "
        "none = the model's n_embd", True, methods=("ptuning", "prefix")),
    Opt("prompt_tuning_init", "str", "SAMPLE_VOCAB", "initial virtual tokens: RANDOM, or "
        "SAMPLE_VOCAB (embeddings of random vocabulary tokens)",
        choices=("RANDOM", "SAMPLE_VOCAB"), methods=("prompt",)),
    Opt("top_k_blocks", "int", 2, "partial fine-tuning: train the top k blocks",
        methods=("partial",)),
]
TRAIN_OPTIONS = train_options()
OPTIONS = {o.name: o for o in RUN_OPTIONS + TRAIN_OPTIONS}
MODEL_KEYS = {"model", "method"} | {o.name for o in RUN_OPTIONS if o.methods}  # fixed on resume


def defaults(method: str) -> dict:
    """Every option that applies to `method`, at its default."""
    d = {o.name: o.default for o in OPTIONS.values() if not o.methods or method in o.methods}
    return {**d, **RECIPE, **METHOD_DEFAULTS[method], "method": method}


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def read_config_file(path: str | Path) -> dict:
    """A TOML or JSON file of options -> {name: converted value}; unknown keys are refused."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    elif path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise UsageError(f"{path}: reading TOML needs Python >= 3.11 or the tomli "
                                 "package; or write the options as JSON") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    else:
        raise UsageError(f"{path}: a config file must end in .toml or .json")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a table of options")
    options = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name == "minift_version":  # run folders' config.json records it
            continue
        if name not in OPTIONS:
            close = difflib.get_close_matches(name, list(OPTIONS), n=1)
            raise UsageError(f"{path}: unknown key {key!r}"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
        if isinstance(value, dict):
            raise UsageError(f"{path}: {key} is a table; options are plain keys (no sections)")
        options[name] = convert(OPTIONS[name], value, f"{path}: {key}")
    return options
