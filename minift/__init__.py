"""minift: a minimal, readable library for fine-tuning GPT-2-style language models."""
from .data import collate, load_dataset, load_jsonl, load_text
from .formats import DataError
from .model import GPT, CausalLMOutput, GPTConfig
from .optim import (AdamW, build_param_groups, get_constant_schedule_with_warmup,
                    get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)
from .config import TrainConfig
from .regularize import EWC, EarlyStopping, GradualUnfreezing
from .step import NonFiniteError
from .tokenizer import Tokenizer
from .train import TrainingInterrupted, TrainResult, train

__all__ = [
    "GPT", "GPTConfig", "CausalLMOutput", "Tokenizer",
    "AdamW", "build_param_groups", "get_linear_schedule_with_warmup",
    "get_cosine_schedule_with_warmup", "get_constant_schedule_with_warmup",
    "DataError", "load_dataset", "load_jsonl", "load_text", "collate",
    "TrainConfig", "train", "TrainResult", "EarlyStopping", "TrainingInterrupted",
    "NonFiniteError", "EWC", "GradualUnfreezing",
]
__version__ = "0.1.0"
