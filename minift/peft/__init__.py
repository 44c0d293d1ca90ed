"""Parameter-efficient fine-tuning with PEFT's names and file format.

    from minift.peft import LoraConfig, get_peft_model, PeftModel
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32))
    peft_model.save_pretrained(dir); PeftModel.from_pretrained(model, dir)
"""
from .adapters import AdapterConfig, BottleneckAdapter, LinearWithAdapter
from .config import AdapterFileNotFoundError, PeftError, TaskType
from .lora import LoraConfig
from .lora_layer import LoraLinear
from .merge import merge_lora
from .model import PeftModel, get_peft_model
from .partial import freeze_all_but_top, unfreeze_all
from .prompts import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

__all__ = ["AdapterConfig", "AdapterFileNotFoundError", "BottleneckAdapter", "LinearWithAdapter",
           "LoraConfig", "LoraLinear", "PeftError", "PeftModel", "PrefixTuningConfig",
           "PromptEncoderConfig", "PromptTuningConfig", "TaskType", "freeze_all_but_top",
           "get_peft_model", "merge_lora", "unfreeze_all"]
