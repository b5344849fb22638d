"""Models: the Llama family.

>>> from fusegrad.models import Llama, LlamaConfig, preset
>>> preset("stories15M").dim
288
"""
from fusegrad.models.llama import PRESETS, Llama, LlamaConfig, preset

__all__ = ["Llama", "LlamaConfig", "PRESETS", "preset"]
