"""Fine-tuning: LoRA adapters through peft (lora.py), which parameters train and in what dtype the frozen ones
are held (freezing.py), and adapters in diffusers' file format (diffusers_lora.py)."""

from flowmatch.adapters.lora import LoraAdapter, LoraLayout

__all__ = ["LoraAdapter", "LoraLayout"]
