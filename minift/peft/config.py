"""What every PEFT method shares: the error type, the task type, adapter_config.json <-> config
dataclass, and PEFT's rule for picking target modules by name.

Each method's config is one flat dataclass in its own file (lora.py, adapters.py, prompts.py)
with PEFT's field names; this file only converts them to and from PEFT's JSON.
"""
from __future__ import annotations

import re
from dataclasses import fields
from enum import Enum

import torch.nn as nn


class PeftError(ValueError):
    """A config, adapter file or target that minift cannot use; the message names the field,
    key, module or file at fault. Nothing is modified when it is raised."""


class AdapterFileNotFoundError(PeftError, FileNotFoundError):
    """adapter_config.json or adapter_model.safetensors is missing (both a PeftError and a
    FileNotFoundError, so either `except` catches it)."""


class TaskType(str, Enum):
    CAUSAL_LM = "CAUSAL_LM"  # the only task a GPT-2 language model has a head for


# adapter_config.json keys that are bookkeeping for PEFT and change nothing numerically here.
# fan_in_fan_out says GPT-2's Conv1D stores (in, out); lora_A/lora_B are (r, in)/(out, r) either way.
IGNORED_KEYS = {"peft_type", "peft_version", "auto_mapping", "revision", "megatron_core",
                "qalora_group_size", "fan_in_fan_out", "tokenizer_kwargs"}


def config_to_dict(config) -> dict:
    """A config -> the dict PEFT writes to adapter_config.json (inference_mode True, as PEFT)."""
    d = {f.name: getattr(config, f.name) for f in fields(config) if f.metadata.get("save", True)}
    d = {k: (v.value if isinstance(v, Enum) else v) for k, v in d.items()}
    d.update(peft_type=config.peft_type, inference_mode=True, **config.extra_json())
    return dict(sorted(d.items()))


def config_from_dict(cls, d: dict, source: str):
    """PEFT's adapter_config.json dict -> `cls`. Unknown keys are accepted only when they are off
    (None, False, {}, []): a PEFT feature minift lacks (lora_bias, rank_pattern, ...) is refused by
    name rather than silently giving different numbers."""
    known = {f.name: f.type for f in fields(cls) if f.init and f.metadata.get("save", True)}
    for key, value in d.items():
        if key == "use_dora" and value and key not in known:
            raise PeftError(f"{source}: use_dora=True applies to LoRA only (DoRA decomposes a "
                            f"LoRA-adapted weight), not to {cls.peft_type}")
        if key not in known and key not in IGNORED_KEYS and value not in (None, False, {}, []):
            raise PeftError(f"{source}: {key}={value!r} is a PEFT feature minift does not implement")
        if key in known and not _fits(value, str(known[key])):
            raise PeftError(f"{source}: {key}={value!r} is not a {known[key]}")
    try:
        return cls(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise PeftError(f"{source}: {e}") from None


_JSON_TYPES = {"None": type(None), "bool": bool, "int": int, "float": (int, float), "str": str}


def _fits(value, annotation: str) -> bool:
    """Does a JSON value fit a field annotation such as "int", "float | None" or
    "list[str] | str"? (A string "r": "8" would otherwise fail deep inside torch.)"""
    for kind in (k.strip() for k in annotation.split("|")):
        if kind.startswith("list["):
            if isinstance(value, list) and all(_fits(v, kind[5:-1]) for v in value):
                return True
        elif kind not in _JSON_TYPES:
            return True   # a type this check does not know: the config's own checks decide
        elif isinstance(value, _JSON_TYPES[kind]) and (kind == "bool"
                                                       or not isinstance(value, bool)):
            return True   # (True is an int to Python, not to a config)
    return False


def check_task_type(task_type) -> None:
    if task_type not in (None, TaskType.CAUSAL_LM, TaskType.CAUSAL_LM.value):
        raise PeftError(f"task_type={task_type!r} is not supported; minift fine-tunes causal "
                        "language models only (TaskType.CAUSAL_LM)")


# --------------------------------------------------------------------------- target modules
def layer_index(name: str, layers_pattern=None) -> int | None:
    """The block number in a module name, found as PEFT finds it: the first `<segment>.<digits>.`
    (transformer.h.3.attn.c_attn -> 3), or after one of `layers_pattern` (e.g. "h")."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match["idx"]) if match else None


def is_target(name: str, target_modules, layers_to_transform=None, layers_pattern=None) -> bool:
    """PEFT's matching rule. A str is a regex the full module name must match; a list matches a
    name equal to an entry or ending in "." + entry ("c_proj" hits attn.c_proj and mlp.c_proj),
    then `layers_to_transform` (int or list) keeps only those block numbers."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if not (name in target_modules or any(name.endswith("." + t) for t in target_modules)):
        return False
    if layers_to_transform is None or layers_to_transform == []:
        return True
    idx = layer_index(name, layers_pattern)
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    return idx is not None and idx in wanted


def find_targets(model: nn.Module, config, holders: tuple = ()) -> list[str]:
    """Names of the nn.Linear modules of `model` that `config` targets. Every entry of a
    target list must exist somewhere in the model, and every match must be a Linear, or one
    of the adapter layers `holders` (which then gets one more adapter; nothing inside a
    holder is ever a target)."""
    inner = [n + "." for n, m in model.named_modules() if n and isinstance(m, holders)]
    names = [n for n, _ in model.named_modules() if n and not any(n.startswith(i) for i in inner)]
    tm = config.target_modules
    if not isinstance(tm, str):
        for t in tm:
            if not any(n == t or n.endswith("." + t) for n in names):
                linears = sorted({n.split(".", 3)[-1] for n, m in model.named_modules()
                                  if isinstance(m, nn.Linear)})
                raise PeftError(f"target module {t!r} does not exist in the model; GPT-2's linear "
                                f"layers are {linears}")
    targets = [n for n in names if is_target(n, tm, config.layers_to_transform,
                                             getattr(config, "layers_pattern", None))]
    if not targets:
        raise PeftError(f"target_modules={tm!r} with layers_to_transform="
                        f"{config.layers_to_transform!r} matches no module of the model")
    modules = dict(model.named_modules())
    for n in targets:
        if not isinstance(modules[n], (nn.Linear, *holders)):
            raise PeftError(f"target module {n!r} is a {type(modules[n]).__name__}, not an nn.Linear "
                            "(or it already holds an adapter); only linear layers can be targeted")
    return targets


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the child module called `name` (dotted path) by `new`: an explicit setattr on
    its parent, the whole of "injection"."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
