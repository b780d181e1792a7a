"""torch.optim.AdamW whose fp32 groups on a GPU step through one multi-tensor Triton kernel (ops/triton_adamw.py).

The same optimizer to everything around it: a torch.optim.AdamW subclass with torch's param_groups, state ("step",
"exp_avg", "exp_avg_sq", the step a device scalar as the fused AdamW keeps it) and so torch's checkpoints, both ways;
the fused AdamW's `grad_scale` (the clip factor, divided out of each gradient as it is read) is honoured. Only the
update's kernel differs: torch's fused kernel moves an fp32 update at about 70% of an H200's copy bandwidth, this one
at about 99% (BENCHMARKS.md, "the dense parameters' AdamW").

kernel="auto" (optim.adamw_kernel): the Triton kernel for a group whose parameters, gradients and moments are
contiguous fp32 tensors on CUDA, without amsgrad, maximize, capturable, differentiable or a tensor lr, and no
`found_inf`; any other group steps through torch's AdamW in the same call. Sharded (DTensor) parameters, as FSDP2
makes them, stay with torch's kernel: the kernel has run on one GPU only.
"torch": always torch's. "triton": the kernel on any device (CPU under the Triton interpreter, for tests), an error
for a group it cannot take.

masters (train/master_weights.MasterWeights): bf16 parameters with fp32 masters. The kernel steps a master with its
parameter's bf16 gradient and writes the result to the parameter (ops/triton_adamw.py, `copies`); the moments are
fp32, made like the master. torch's AdamW cannot step them, so a group holding one steps through the kernel or fails.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .distributed import local_tensor

KERNELS = ("auto", "torch", "triton")


@contextlib.contextmanager
def grads_hidden(groups):
    """The gradients of these param groups set to None inside the block (and put back after it, whatever happens):
    torch's AdamW.step steps every parameter with a gradient, so a group stepped another way is hidden from it."""
    hidden = [(p, p.grad) for g in groups for p in g["params"] if p.grad is not None]
    for p, _ in hidden:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in hidden:
            p.grad = grad


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW; see the module docstring for `kernel`."""

    def __init__(self, params, kernel: str = "auto", masters=None, **adamw_kwargs):
        if kernel not in KERNELS:
            raise ValueError(f"optim.adamw_kernel: must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if masters and kernel == "torch":
            raise ValueError("optim.adamw_kernel=torch cannot step bf16 weights with fp32 masters")
        super().__init__(params, **adamw_kwargs)
        self.kernel = kernel
        self.masters = masters  # MasterWeights or None
        self._launches: dict = {}  # id(group) -> (what it was built for, [(AdamWLaunch, its params)] or None)

    def _master(self, p):
        return self.masters.master_of(p) if self.masters is not None else None

    def _state_dtype(self, p: torch.Tensor, key: str) -> torch.dtype:
        """The dtype of floating state tensor `key` of p (fp32 here; a subclass may keep some in bf16)."""
        return torch.float32

    def _why_not(self, group, params) -> Optional[str]:
        """Why the Triton kernel cannot take this group's parameters (None: it can). Its per-tensor checks ran when
        the group's launch was built; the gradients are checked by the launch at every step."""
        for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
            if group.get(flag):
                return f"{flag}=True"
        if isinstance(group["lr"], torch.Tensor):
            return "a tensor learning rate"
        if getattr(self, "found_inf", None) is not None:
            return "found_inf is set"
        for p in params:
            if hasattr(p, "device_mesh") or hasattr(p.grad, "device_mesh"):
                return "a sharded (DTensor) parameter"
            master = self._master(p)
            grad_dtype = torch.float32 if master is None else torch.bfloat16
            if p.grad.is_sparse or p.grad.dtype != grad_dtype:
                return f"a gradient that is not a dense {'fp32' if master is None else 'bf16'} tensor"
            state = self.state[p]
            tensors = [p if master is None else master]
            tensors += [state["exp_avg"], state["exp_avg_sq"], state["step"]] if state else []
            if not all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
                return "a parameter or state that is not a contiguous fp32 tensor"
            if self.kernel == "auto" and not all(t.is_cuda for t in tensors):
                return "a tensor off the GPU"
        return None

    @staticmethod
    def _layout(params) -> tuple:
        """What a launch is built for: the parameters' addresses and sizes (a launch addresses their data, whatever
        Python objects hold it). Their state changes only where the launch is built or in load_state_dict, which
        drops every launch."""
        return tuple((p.data_ptr(), p.shape) for p in params)

    def load_state_dict(self, state_dict) -> None:
        self._launches.clear()  # the loaded state lives in new tensors
        # torch casts every floating state tensor to its parameter's dtype on load: a bf16 parameter's fp32 moments
        # (and master) would lose their low bits, and the resume its exactness. Keep each in its own dtype.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        keep = {}
        for sid, p in zip(saved_ids, params):
            if p.dtype != torch.float32 and sid in state_dict["state"]:
                keep[p] = {k: v for k, v in state_dict["state"][sid].items()
                           if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point()}
        super().load_state_dict(state_dict)
        for p, tensors in keep.items():
            for k, v in tensors.items():
                self.state[p][k] = v.to(device=p.device, dtype=self._state_dtype(p, k))

    def _launch(self, group, params):
        """The kernel's launches for `params`, this group's parameters with a gradient: [(AdamWLaunch, its params)],
        one for the fp32 parameters and one for those with masters (built once per layout, state created as torch's
        fused AdamW creates it), or None when torch's AdamW steps the group."""
        if not params:
            return None
        key = (self._layout(params), getattr(self, "found_inf", None) is None)
        cached = self._launches.get(id(group))
        if cached is not None and cached[0] == key:
            return cached[1]
        mastered = [p for p in params if self._master(p) is not None]
        why = "optim.adamw_kernel=torch" if self.kernel == "torch" else self._why_not(group, params)
        if why is None:
            try:
                from ops.triton_adamw import AdamWLaunch
            except ImportError as e:  # no usable Triton here: torch's kernel, as for any group it cannot take
                why = f"the kernel is unavailable: {e}"
        launches = None
        if why is not None:
            if mastered:
                raise RuntimeError(f"train.weight_dtype=bf16: the Triton AdamW kernel cannot step the group of "
                                   f"weights with fp32 masters: {why}")
            if self.kernel == "triton":
                raise RuntimeError(f"optim.adamw_kernel=triton: the kernel cannot step this group: {why}")
        else:
            launches = []
            plain = [p for p in params if self._master(p) is None]
            for part, copies in ((plain, False), (mastered, True)):
                if not part:
                    continue
                stepped = [self._master(p) if copies else p for p in part]
                for p, t in zip(part, stepped):
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32, device=t.device)
                        state["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)
                state_lists = ([self.state[p][k] for p in part] for k in ("exp_avg", "exp_avg_sq", "step"))
                launches.append((AdamWLaunch(stepped, *state_lists, copies=part if copies else None), part))
        self._launches[id(group)] = (key, launches)
        return launches

    def _step_group(self, group) -> bool:
        """Step `group` by a rule of a subclass's own and return True; False (here, always) leaves it to AdamW."""
        return False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_torch = []
        for group in self.param_groups:
            if self._step_group(group):
                continue
            launches = self._launch(group, [p for p in group["params"] if p.grad is not None])
            if launches is None:
                by_torch.append(group)
            else:
                for launch, params in launches:
                    self._kernel_step(group, launch, params)
        if any(p.grad is not None for g in by_torch for p in g["params"]):
            torch_ids = {id(g) for g in by_torch}
            with grads_hidden([g for g in self.param_groups if id(g) not in torch_ids]):  # stepped above
                super().step()
        return loss

    def grad_scale_on(self, device) -> Optional[torch.Tensor]:
        """`grad_scale` (torch's fused AdamW contract: every gradient is divided by it) as an fp32 scalar on `device`,
        or None when there is none."""
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return None
        return local_tensor(grad_scale).to(device=device, dtype=torch.float32).reshape(())

    def _kernel_step(self, group, launch, params) -> None:
        grad_scale = self.grad_scale_on(launch.device)
        torch._foreach_add_([self.state[p]["step"] for p in params], 1)
        beta1, beta2 = group["betas"]
        launch.step([p.grad for p in params], lr=float(group["lr"]), weight_decay=group["weight_decay"],
                    beta1=beta1, beta2=beta2, eps=group["eps"], grad_scale=grad_scale)
