"""minift: a minimal, readable library for fine-tuning GPT-2-style language models."""
from .model import GPT, GPTConfig, CausalLMOutput

__all__ = ["GPT", "GPTConfig", "CausalLMOutput"]
__version__ = "0.1.0"
