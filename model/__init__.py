"""Llama-style language model with product-key memory layers."""
from .attention import KVCache, attention_kernel, prepare_attention
from .config import MemoryConfig, ModelConfig
from .memory import MemoryLayer, ValuePool, prepare_memory_kernels, value_parameters
from .transformer import Transformer

__all__ = ["ModelConfig", "MemoryConfig", "Transformer", "MemoryLayer", "ValuePool", "KVCache", "value_parameters",
           "attention_kernel", "prepare_attention", "prepare_memory_kernels"]
