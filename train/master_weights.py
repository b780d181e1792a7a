"""bf16 weights with fp32 masters for the blocks' linear layers (`train.weight_dtype`).

Under bf16 autocast every fp32 weight of a matmul is cast to bf16 where the forward uses it, and its bf16 gradient
is cast back to fp32 in the backward: two passes over each weight per step, one launch each (BENCHMARKS.md,
"bf16 weights with fp32 masters"). With weight_dtype=bf16 the nn.Linear weights of the blocks are stored in bf16,
holding exactly the values autocast would cast them to, and their fp32 masters are kept here. The optimizer
(train/adamw.py) steps each master with its weight's bf16 gradient read as fp32 and writes the master back to the
weight rounded to nearest even, as the cast rounds. A step computes what the autocast step computes, with the same
update, while one micro-batch makes the gradient: the gradients of several would be summed in bf16, so bf16 weights
take train.grad_accum=1.

The state dict holds the masters under the weights' names, fp32 as in any run: checkpoints, exports and
checkpoint.init_from read and write the same tensors whatever weight_dtype, and loading a state dict sets the
masters, then the weights from them. Left in fp32: the embedding and output projection (the loss casts the output
weight once per forward and keeps its gradient fp32), norms, biases, product keys and value tables (their own dtype,
model.memory.value_dtype). Several processes shard with FSDP2, whose bf16 parameter policy makes its own copies.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .config import ConfigError, TrainConfig, weight_dtype_conflict

DTYPE = torch.bfloat16


def resolve_weight_dtype(cfg: TrainConfig, rt) -> str:
    """"fp32" or "bf16" for this run (train.weight_dtype; auto: bf16 where the step allows it). Raises ConfigError
    for an explicit bf16 that this run cannot take."""
    choice = cfg.train.weight_dtype
    if choice == "fp32":
        return "fp32"
    why_not = weight_dtype_conflict(cfg) or _runtime_conflict(cfg, rt)
    if why_not is None:
        return "bf16"
    if choice == "bf16":
        raise ConfigError(f"train.weight_dtype=bf16: not for this run: {why_not}")
    return "fp32"


def _runtime_conflict(cfg: TrainConfig, rt):
    """What this run's device, autocast dtype or process count rule out for bf16 weights, or None."""
    if rt.dtype != DTYPE:
        return f"it needs bf16 autocast (train.precision resolves to {rt.dtype or 'fp32'} here)"
    if rt.world_size > 1:
        return "several processes shard with FSDP2, whose bf16 parameter policy makes its own copies"
    if cfg.optim.adamw_kernel == "auto" and rt.device.type != "cuda":
        return "the Triton AdamW kernel runs on a GPU (optim.adamw_kernel=triton runs it under TRITON_INTERPRET=1)"
    return None


def block_linear_weights(model: torch.nn.Module) -> List[torch.nn.Linear]:
    """The nn.Linear layers of the blocks whose weights train (in model order)."""
    return [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]


class MasterWeights:
    """The fp32 masters of the bf16 weights of `layers` (block_linear_weights), which this converts in place, and the
    state-dict hooks that save and load the masters under the weights' names (see the module docstring)."""

    def __init__(self, layers: List[torch.nn.Linear]):
        self._masters: Dict[int, torch.Tensor] = {}
        self._params: List[torch.nn.Parameter] = []  # held, so that the ids above stay theirs
        with torch.no_grad():
            for layer in layers:
                weight = layer.weight
                if weight.dtype != torch.float32:
                    raise ValueError(f"master weights: a {weight.dtype} weight has no fp32 master to keep")
                master = weight.detach().clone(memory_format=torch.contiguous_format)
                weight.data = master.to(DTYPE)
                self._masters[id(weight)] = master
                self._params.append(weight)
                layer.register_state_dict_post_hook(_save_master(master))
                layer.register_load_state_dict_pre_hook(_load_master(master))

    def __len__(self) -> int:
        return len(self._params)

    def master_of(self, param: torch.Tensor):
        """param's fp32 master, or None when it has none."""
        return self._masters.get(id(param))

    def parameters(self) -> List[torch.nn.Parameter]:
        return list(self._params)


def _save_master(master: torch.Tensor):
    def hook(module, state_dict, prefix, local_metadata) -> None:
        if prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = master
    return hook


def _load_master(master: torch.Tensor):
    def hook(module, state_dict, prefix, *args) -> None:
        value = state_dict.get(prefix + "weight")
        # (the master itself when DCP loaded into the state dict's tensors; a wrong shape: load_state_dict reports it)
        if isinstance(value, torch.Tensor) and value is not master and value.shape == master.shape:
            with torch.no_grad():
                master.copy_(value)
    return hook


def apply_master_weights(model: torch.nn.Module, cfg: TrainConfig, rt):
    """The blocks' linear weights in bf16 with fp32 masters when this run's weight dtype is bf16: the MasterWeights
    (the optimizer steps the masters), else None."""
    if resolve_weight_dtype(cfg, rt) != "bf16":
        return None
    return MasterWeights(block_linear_weights(model))
