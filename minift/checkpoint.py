"""Hugging Face GPT-2 folders <-> minift's named tensors and config dict.

A GPT-2 checkpoint folder holds `config.json` and either `model.safetensors` or a
sharded `model.safetensors.index.json` pointing at several safetensors files.
minift keeps GPT-2's parameter names, so loading is one shape-checked loop; the only
twist is that OpenAI's GPT-2 stores its linear layers as `Conv1D` with the weight
transposed, (in, out) instead of nn.Linear's (out, in).

This module knows files, not the model: GPT.from_pretrained / save_pretrained (model.py)
call it, so the imports run one way. Nothing here unpickles: `.bin` / `.pt` files are
refused (a pickle can run code).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .io import save_safetensors, write_json

EMBEDDED = {"minift-tiny": Path(__file__).parent / "assets" / "minift-tiny"}

# GPT-2's Conv1D layers store (in_features, out_features); nn.Linear stores (out, in).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers some GPT-2 checkpoints carry; minift builds its mask on the fly.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # not ".attn.c_attn.bias"!
PICKLE_FILES = ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")


def _hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, honouring the same variables as huggingface_hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _from_hf_cache(repo_id: str) -> Path | None:
    """`models--{org}--{name}/snapshots/{rev}` where refs/main names rev; None if absent."""
    repo = _hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
    return snaps[-1] if snaps else None


def resolve_source(src: str | os.PathLike) -> Path:
    """Turn `src` into a local folder: a path, "minift-tiny", or a hub id in the local cache.

    With the `hub` extra installed, a hub id that is not cached is downloaded.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if str(src) in EMBEDDED:
        folder = EMBEDDED[str(src)]
        if not folder.is_dir():
            raise FileNotFoundError(f"the embedded model {src!r} is missing from {folder}; "
                                    "rebuild it with scripts/pretrain_tiny.py")
        return folder
    if path.exists():
        raise NotADirectoryError(f"{src}: expected a folder holding config.json, got a file")
    if path.is_absolute() or str(src).startswith((".", "~")) or str(src).count("/") > 1:
        raise FileNotFoundError(f"{src}: no such folder")  # a path, not a hub id "org/name"
    cached = _from_hf_cache(str(src))
    if cached is not None:
        return cached
    try:
        from huggingface_hub import snapshot_download  # optional: the `hub` extra
    except ImportError:
        raise FileNotFoundError(
            f"{src}: no such folder, and not in the Hugging Face cache ({_hf_hub_cache()}); "
            "install minift[hub] to download it") from None
    try:   # the download the `hub` extra is for (README: Using a real GPT-2 ...)
        return Path(snapshot_download(str(src),
                                      allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # offline, no such repository, a gated one, an invalid id, ...:
        # huggingface_hub's many error types all mean the same here, and none names `src`
        why = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:200]
        raise FileNotFoundError(
            f"{src}: no such folder, not in the Hugging Face cache ({_hf_hub_cache()}), and "
            f"the hub download failed ({type(e).__name__}{': ' + why if why else ''})") from None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; a GPT-2 folder needs config.json") from None
    # ValueError: bad JSON or UTF-8, or a 5000-digit number; RecursionError: [[[[... nested
    # too deep; OSError: a folder or unreadable file in its place
    except (ValueError, RecursionError, OSError) as e:
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(d).__name__}")
    return d


def _check_config_types(d: dict, path: Path) -> None:
    """The numbers GPTConfig builds a model from, checked before it does (a string, 0, inf
    or 1e9 layers would fail deep inside torch, or take forever, without naming the file)."""
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "n_inner"):
        v = d.get(name)
        if (name in d and not (name == "n_inner" and v is None)
                and (not isinstance(v, int) or isinstance(v, bool) or v <= 0)):
            raise ValueError(f"{path}: {name} must be a positive integer, got {v!r}")
    for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "layer_norm_epsilon",
                 "initializer_range"):
        v = d.get(name, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{path}: {name} must be a finite number, got {v!r}")
        if name.endswith("pdrop") and not 0 <= v <= 1:
            raise ValueError(f"{path}: {name} is a probability, got {v!r}")
    if not isinstance(d.get("tie_word_embeddings", True), bool):  # "no" would count as true
        raise ValueError(f"{path}: tie_word_embeddings must be true or false, got "
                         f"{d['tie_word_embeddings']!r}")
    if not isinstance(d.get("activation_function", "gelu_new"), str):
        raise ValueError(f"{path}: activation_function must be a string such as \"gelu_new\", "
                         f"got {d['activation_function']!r}")


def read_config(folder: Path) -> dict:
    """config.json, checked: a JSON object of a GPT-2 model whose numbers are sane (GPT's
    from_pretrained turns it into a GPTConfig)."""
    d = _read_json(folder / "config.json")
    _check_config_types(d, folder / "config.json")
    if d.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{folder / 'config.json'}: model_type {d.get('model_type')!r} is not "
                         "supported; minift implements GPT-2 ('gpt2') only")
    # GPT-2 variants transformers can build and minift does not: their logits would differ
    for key, plain in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                       ("scale_attn_weights", True)):
        if d.get(key, plain) != plain:
            raise ValueError(f"{folder / 'config.json'}: {key}={d[key]!r} is not supported by "
                             f"minift (it implements GPT-2's {key}={plain})")
    return d


def check_tokenizer_fits(tokenizer, vocab_size: int, model: str | os.PathLike,
                         tokenizer_from: str | os.PathLike | None = None) -> None:
    """Raise ValueError unless every id of `tokenizer` (loaded from `tokenizer_from`, by
    default the model's own folder) is a row of the model's embedding (config.json's
    vocab_size): an id beyond it fails inside torch as "index out of range in self". A
    larger model vocabulary is fine (GPT-2 variants pad theirs). An eos_token the
    tokenizer's vocabulary lacks is added as a new id past its end, so it is named."""
    if tokenizer.vocab_size <= vocab_size:
        return
    where = f"{tokenizer_from} (the tokenizer of {model})" if tokenizer_from is not None \
        else str(model)
    eos = tokenizer.eos_token_id
    if eos is not None and eos >= vocab_size:
        raise ValueError(f"{where}: the eos_token {tokenizer.eos_token!r} has id {eos}, outside "
                         f"the model's vocabulary (config.json vocab_size={vocab_size}); is it "
                         "in the tokenizer's vocabulary? (tokenizer_config.json)")
    raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, but the "
                     f"model's config.json has vocab_size={vocab_size}; the tokenizer does not "
                     "belong to this model")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: one file, or the shards an index names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(s, str) and s and "\x00" not in s for s in weight_map.values()):
            raise ValueError(f"{index}: weight_map must map tensor names to file names")
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if Path(s).is_absolute() or ".." in Path(s).parts:  # an index can't point outside
                raise ValueError(f"{index}: shard path {s!r} leaves the folder")
            if not (folder / s).is_file():
                raise FileNotFoundError(f"{index}: names shard {s}, which is missing")
        return [folder / s for s in shards]
    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise ValueError(f"{folder}: only pickle weights found ({', '.join(sorted(pickles))}); "
                         "minift never unpickles model files (they can run code). Convert them "
                         "to model.safetensors, e.g. with transformers' save_pretrained.")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def hf_to_minift_name(key: str) -> str | None:
    """A checkpoint key -> minift's parameter name, or None for buffers to skip."""
    key = key.removeprefix("transformer.")
    if ("." + key).endswith(IGNORED_SUFFIXES):
        return None
    return key if key.startswith("lm_head.") else "transformer." + key


def read_weights(folder: Path, expected: dict[str, torch.Size], n_layer: int,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The folder's tensors under minift's names, each checked against `expected` (name ->
    shape of the model being built; a tied lm_head is absent from it and skipped here)."""
    tensors = []  # (file, key, tensor): all read first, to check n_layer
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors += [(file, key, f.get_tensor(key)) for key in f.keys()]
        except SafetensorError as e:  # truncated, corrupted, not safetensors at all
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    blocks = {key.removeprefix("transformer.").split(".")[1] for _, key, _ in tensors
              if key.removeprefix("transformer.").startswith("h.")}
    if len(blocks) != n_layer:
        raise ValueError(f"{folder / 'config.json'}: n_layer={n_layer}, but the weights "
                         f"hold {len(blocks)} blocks")
    loaded = {}
    for file, key, t in tensors:
        name = hf_to_minift_name(key)
        if name is None or (name == "lm_head.weight" and name not in expected):
            continue
        if name not in expected:
            raise ValueError(f"{file}: unexpected key {key!r} for a GPT-2 model")
        if not t.is_floating_point():
            raise ValueError(f"{file}: key {key!r} holds {t.dtype}, not floating point")
        if name.endswith(TRANSPOSED) and t.ndim == 2:
            t = t.t()  # Conv1D (in, out) -> Linear (out, in): a view, no copy (FSDP copies later)
        if t.shape != expected[name]:
            raise ValueError(f"{file}: key {key!r} has shape {tuple(t.shape)} but "
                             f"config.json implies {tuple(expected[name])}")
        loaded[name] = t.to(dtype) if dtype is not None else t
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"{folder}: checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
    return loaded


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """minift parameters -> GPT-2's checkpoint keys and Conv1D layout (lm_head left out if tied)."""
    sd = {}
    for name, t in state_dict.items():
        if name == "lm_head.weight" and tied:
            continue
        t = t.t() if name.endswith(TRANSPOSED) else t
        sd[name] = t.detach().contiguous().cpu()
    return sd


def hf_config_dict(config: dict) -> dict:
    """A GPTConfig's fields plus what transformers' GPT2Config expects to find."""
    return {**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "n_ctx": config["n_positions"], "scale_attn_weights": True,
            "summary_type": "cls_index", "use_cache": True}


def write_folder(folder, config: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors, in the layout transformers loads (config: GPTConfig
    fields as a dict)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", hf_config_dict(config))
    tensors = to_hf_state_dict(state_dict, config.get("tie_word_embeddings", True))
    save_safetensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})
