"""Reading adapter folders: adapter_config.json -> the config dataclass its peft_type names,
adapter_model.safetensors -> tensors; paths that lead outside the folder and pickles are refused."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .adapters import AdapterConfig
from .config import AdapterFileNotFoundError, PeftError, config_from_dict
from .lora import LoraConfig
from .prompts import PROMPT_CONFIGS

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
CONFIGS = {c.peft_type: c for c in (LoraConfig, AdapterConfig, *PROMPT_CONFIGS)}


def _inside(folder: Path, name: str) -> Path:
    """folder / name, refusing anything (.., absolute paths, symlinks) that leads outside."""
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise PeftError(f"{path} leads outside the adapter folder {folder}; refusing to read it")
    return path


def adapter_folder(model_id, subfolder=None) -> Path:
    folder = Path(model_id).expanduser()
    if subfolder:
        folder = _inside(folder, subfolder)
    if not folder.is_dir():
        raise AdapterFileNotFoundError(f"{folder}: no such adapter folder (minift reads local "
                                       "folders holding adapter_config.json)")
    return folder


def load_adapter_config(folder: Path):
    """adapter_config.json -> the config dataclass its peft_type names."""
    path = _inside(folder, CONFIG_NAME)
    if not path.is_file():
        raise AdapterFileNotFoundError(f"{path}: missing; an adapter folder holds {CONFIG_NAME} "
                                       f"and {WEIGHTS_NAME}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # also a 5000-digit number, [[[[... too deep
        raise PeftError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    got = d.get("peft_type") if isinstance(d, dict) else None
    if not isinstance(got, str) or got not in CONFIGS:
        raise PeftError(f"{path}: unknown peft_type {got!r}; minift loads {sorted(CONFIGS)}")
    return config_from_dict(CONFIGS[d["peft_type"]], d, str(path))


def load_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors -> tensors. Pickled .bin files are refused, never opened."""
    path = _inside(folder, WEIGHTS_NAME)
    if not path.is_file():
        pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickles:
            raise PeftError(f"{folder}: only {pickles[0]} found, a pickle that could run code; "
                            "minift reads adapter_model.safetensors only. Re-save it with PEFT: "
                            "PeftModel.from_pretrained(...).save_pretrained(dir)")
        raise AdapterFileNotFoundError(f"{path}: missing; an adapter folder holds {CONFIG_NAME} "
                                       f"and {WEIGHTS_NAME}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file: name it
        raise PeftError(f"{path}: not a readable safetensors file ({e})") from None
