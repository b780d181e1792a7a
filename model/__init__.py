"""Llama-style language model with product-key memory layers."""
from .attention import KVCache
from .config import MemoryConfig, ModelConfig
from .memory import MemoryLayer, ValuePool, prepare_memory_kernels, value_parameters
from .transformer import Transformer

__all__ = ["ModelConfig", "MemoryConfig", "Transformer", "MemoryLayer", "ValuePool", "KVCache", "value_parameters",
           "prepare_memory_kernels"]
