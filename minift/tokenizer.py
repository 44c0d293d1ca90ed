"""A GPT-2 tokenizer over the `tokenizers` library, loading and saving Hugging Face folders.

A GPT-2 tokenizer is byte-level BPE (Radford et al. 2019, section 2.2): text is split
into words by a regex, each word's UTF-8 bytes are mapped to 256 printable characters,
and learned merges join them into tokens. So every string encodes, with no unknown
token. The Rust `tokenizers` library does the work; this file only finds the files,
knows the special tokens and pads batches.

A folder holds either `tokenizer.json` (the whole pipeline in one file) or GPT-2's
original pair `vocab.json` + `merges.txt`; `tokenizer_config.json` and
`special_tokens_map.json` name the special tokens, and `chat_template` in
tokenizer_config.json (or transformers 5's `chat_template.jinja`) holds the chat template
that minift.chat renders.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from .checkpoint import resolve_source
from .io import atomic_write, write_json

EOS = "<|endoftext|>"  # GPT-2's only special token; it serves as eos, bos and (by habit) pad
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token")


def _token_str(value) -> str | None:
    """Config files store a token as "<|x|>" or as a serialized AddedToken {"content": "<|x|>"}."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


class Tokenizer:
    """Byte-level BPE with GPT-2's special tokens; call it like a Hugging Face tokenizer."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str | None = EOS,
                 bos_token: str | None = None, pad_token: str | None = None,
                 model_max_length: int | None = None, chat_template: str | None = None):
        self.backend = backend
        self.chat_template = chat_template  # Jinja text, or None: minift.chat's built-in one
        self.eos_token = eos_token
        self.bos_token = bos_token if bos_token is not None else eos_token  # GPT-2: bos == eos
        # GPT-2 was trained without padding, so it has no pad token; fine-tuning pads with
        # eos, and the attention mask / -100 labels make the pad id itself irrelevant.
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.model_max_length = model_max_length  # only used by truncation=True without max_length
        # Register the specials so "<|endoftext|>" inside text encodes as one id, not 7 pieces.
        specials = {t for t in (self.eos_token, self.bos_token, self.pad_token) if t is not None}
        backend.add_special_tokens(sorted(specials))

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, src: str | os.PathLike) -> "Tokenizer":
        """Load from a Hugging Face folder, a hub id in the local cache, or "minift-tiny"."""
        folder = resolve_source(src)
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (folder / name).is_file():
                config.update({k: v for k, v in _read_json(folder / name).items() if v is not None})
        for key in SPECIAL_KEYS:  # a token is "<|x|>" or {"content": "<|x|>"}, nothing else
            if key in config and not isinstance(_token_str(config[key]), str):
                raise ValueError(f"{folder}: {key} in tokenizer_config.json or "
                                 f"special_tokens_map.json is not a token string: {config[key]!r}")
        tok_file, vocab, merges = folder / "tokenizer.json", folder / "vocab.json", folder / "merges.txt"
        if not (tok_file.is_file() or (vocab.is_file() and merges.is_file())):
            raise FileNotFoundError(f"{folder}: no tokenizer found; looked for tokenizer.json, "
                                    "or vocab.json together with merges.txt")
        try:
            if tok_file.is_file():
                backend = tokenizers.Tokenizer.from_file(str(tok_file))
            else:
                backend = cls._gpt2_pipeline(BPE.from_file(str(vocab), str(merges)))
        except Exception as e:  # the Rust library raises a bare Exception on a corrupt file
            raise ValueError(f"{folder}: could not load the tokenizer files: {e}") from None
        # A token named in a config is used as is; GPT-2's default eos only if the vocab has it.
        eos = _token_str(config.get("eos_token"))
        if eos is None and backend.token_to_id(EOS) is not None:
            eos = EOS
        max_len = config.get("model_max_length")
        return cls(backend, eos_token=eos, bos_token=_token_str(config.get("bos_token")),
                   pad_token=_token_str(config.get("pad_token")),
                   model_max_length=max_len if isinstance(max_len, int) and max_len < 10**9 else None,
                   chat_template=_chat_template(folder, config))

    @staticmethod
    def _gpt2_pipeline(model: BPE) -> tokenizers.Tokenizer:
        """GPT-2's pipeline around a BPE model: no prefix space (GPT-2 was trained without one)."""
        backend = tokenizers.Tokenizer(model)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only
        return backend

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json.

        transformers' AutoTokenizer / GPT2TokenizerFast load the folder unchanged.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "tokenizer.json", lambda tmp: self.backend.save(str(tmp)))
        specials = {k: getattr(self, k) for k in SPECIAL_KEYS if getattr(self, k) is not None}
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, **specials}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:  # in the config, where every transformers version reads it
            config["chat_template"] = self.chat_template
        for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            write_json(folder / name, data)

    @classmethod
    def train_bpe(cls, texts, vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
        """Train a GPT-2-style byte-level BPE on an iterable of strings.

        All 256 byte symbols are in the vocabulary, so any text encodes; "<|endoftext|>"
        gets id 0 (the trainer puts special tokens first; GPT-2 has it last, at 50256).
        """
        backend = cls._gpt2_pipeline(BPE())
        trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    # ---------------------------------------------------------------- special tokens, sizes
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """{"bos_token": ..., "eos_token": ..., "pad_token": ...}, as transformers names them
        (chat templates see these as variables)."""
        return {k: getattr(self, k) for k in SPECIAL_KEYS if getattr(self, k) is not None}

    @property
    def special_ids(self) -> set[int]:
        """Ids of the added tokens (eos, and a template's end-of-turn tokens such as <|im_end|>)."""
        return set(self.backend.get_added_tokens_decoder())

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the model's embedding must have this many rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---------------------------------------------------------------- encoding and decoding
    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = self.backend.encode(text).ids
        return ids + [self.eos_token_id] if add_eos else ids

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Batch-encode; each text gives (ids, offsets), offsets[i] = (start, end) of token i
        in characters of the text (what the chat masks need to map spans to tokens)."""
        return [(e.ids, e.offsets) for e in self.backend.encode_batch(texts)] if texts else []

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(self, text, padding=False, truncation=False, max_length=None,
                 return_tensors=None, padding_side="right") -> dict:
        """Encode a string or a list of strings into {"input_ids", "attention_mask"}.

        padding: False (none), True / "longest" (to the longest in the batch), or
        "max_length". truncation keeps the first max_length tokens. Use right padding for
        training and left padding for generation, so new tokens follow the prompt directly.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if truncation and max_length is None:
            max_length = self.model_max_length
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        ids = [e.ids for e in self.backend.encode_batch(texts)] if texts else []
        if truncation and max_length is not None:
            ids = [x[:max_length] for x in ids]
        masks = [[1] * len(x) for x in ids]
        if padding in (True, "longest", "max_length") and ids:
            width = max_length if padding == "max_length" else max(map(len, ids))
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token; set tokenizer.pad_token")
            ids = [_pad(x, width, self.pad_token_id, padding_side) for x in ids]
            masks = [_pad(m, width, 0, padding_side) for m in masks]
        out = {"input_ids": ids, "attention_mask": masks}
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("sequences have different lengths; pass padding=True to make a tensor")
            out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}  # (B, T)
        elif return_tensors is not None:
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        elif single:  # like Hugging Face: one string in, flat lists out
            out = {k: v[0] for k, v in out.items()}
        return out


def _chat_template(folder: Path, config: dict) -> str | None:
    """The folder's chat template: chat_template.jinja (transformers >= 4.43 writes it), else
    tokenizer_config.json's "chat_template": a string, or a list of {"name", "template"}
    from which "default" is used (as transformers does)."""
    if (folder / "chat_template.jinja").is_file():
        try:
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{folder / 'chat_template.jinja'}: not readable UTF-8 text ({e})") from None
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        named = {t.get("name"): t.get("template") for t in value}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list "
                     f"of {{\"name\", \"template\"}} with a \"default\" one, got {str(value)[:80]!r}")


def _pad(seq: list[int], width: int, value: int, side: str) -> list[int]:
    fill = [value] * (width - len(seq))
    return seq + fill if side == "right" else fill + seq
