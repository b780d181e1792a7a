"""Checkpoints: model and optimizer through torch.distributed.checkpoint (DCP), plus the small state needed to
continue exactly where a run stopped (step, scheduler, data position, RNG state).

Layout of `run_dir/checkpoints/step_<N>/`:
  DCP shards (*.distcp, .metadata)   model + optimizer, resharding-friendly (save on 2 ranks, load on 1)
  meta.json                          step, scheduler, data loader state, configs, and the size of every file above
  rng_rank<R>.pt                     each rank's RNG states
A checkpoint is written to `step_<N>.tmp` and renamed only once complete, so a crash mid-save never
leaves a half checkpoint that resume would pick up, and older checkpoints are deleted only afterwards.
Files damaged later (truncated, deleted) are caught by the sizes in meta.json before DCP reads anything, and
resume falls back to the newest checkpoint that loads (`load_newest`).
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from model.checkpoint import CHECKPOINTS_DIR, META_FILE, list_checkpoints, single_process_dcp

# DCP raises CheckpointException, which derives from BaseException, not Exception.
try:
    from torch.distributed.checkpoint.api import CheckpointException
except ImportError:  # pragma: no cover - older torch
    CheckpointException = Exception

_LOAD_ERRORS = (Exception, CheckpointException)


class CheckpointError(RuntimeError):
    """No usable checkpoint (the message names each one tried and what was wrong with it)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _step_of(path: str) -> int:
    return int(os.path.basename(path).split("_")[1])


def prune_checkpoints(run_dir: str, keep: int, keep_every: int = 0) -> None:
    """Delete all but the newest `keep` checkpoints; those at multiples of `keep_every` are permanent."""
    for old in list_checkpoints(run_dir)[:-keep]:
        if keep_every and _step_of(old) % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)


def _file_sizes(path: str) -> Dict[str, int]:
    return {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path)) if name != META_FILE}


def _begin(run_dir: str, step: int) -> Tuple[str, str]:
    final = os.path.join(run_dir, CHECKPOINTS_DIR, f"step_{step}")
    tmp = final + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    return tmp, final


def _finish(tmp: str, final: str, step: int, meta: Dict[str, Any], keep: int, keep_every: int) -> None:
    """After every rank wrote its files: meta.json (with the file sizes), rename, prune. Collective."""
    _barrier()
    if _rank() == 0:
        record = dict(meta, step=step, world_size=_world_size(), files=_file_sizes(tmp))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(record, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(os.path.dirname(os.path.dirname(final)), keep, keep_every)
    _barrier()


def save_checkpoint(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: Dict[str, Any],
    keep: int,
    keep_every: int = 0,
) -> str:
    """Save step `step`; every rank calls this. Returns the final directory."""
    tmp, final = _begin(run_dir, step)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with single_process_dcp():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    _finish(tmp, final, step, meta, keep, keep_every)
    return final


def _device_of_default_group() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Checkpointer:
    """Saves a run's checkpoints, synchronously or (async_save) in a background thread, at most one in flight.

    An asynchronous save copies the state to host memory before returning, so training continues while the
    files are written; the checkpoint becomes visible (meta.json, rename, pruning) only once every rank has
    finished writing, at the next `poll`/`save`/`wait`. The background writes use a process group of their own,
    so their collectives never interleave with the training's.
    """

    def __init__(self, run_dir: str, keep: int, keep_every: int = 0, async_save: bool = False):
        self.run_dir, self.keep, self.keep_every, self.async_save = run_dir, keep, keep_every, async_save
        self._pending: Optional[Tuple[Future, str, str, int, Dict[str, Any]]] = None
        self._group = None
        if async_save and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # async DCP needs a CPU backend

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def save(self, step: int, model, optimizer, meta: Dict[str, Any]) -> str:
        """Synchronous: returns the saved directory. Asynchronous: returns the directory it will have."""
        self.wait()
        if not self.async_save:
            return save_checkpoint(self.run_dir, step, model, optimizer, meta, self.keep, self.keep_every)
        tmp, final = _begin(self.run_dir, step)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        result = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, process_group=self._group)
        future = getattr(result, "upload_completion", result)  # newer torch may return an AsyncSaveResponse
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
        self._pending = (future, tmp, final, step, json.loads(json.dumps(meta)))  # a snapshot: training goes on
        return final

    def wait(self) -> Optional[str]:
        """Block until the in-flight save is written, then publish it. Returns its directory (None if none)."""
        if self._pending is None:
            return None
        future, tmp, final, step, meta = self._pending
        self._pending = None
        future.result()
        _finish(tmp, final, step, meta, self.keep, self.keep_every)
        return final

    def poll(self) -> Optional[str]:
        """Publish the in-flight save if every rank has finished writing it (a collective when distributed)."""
        if self._pending is None:
            return None
        done = torch.tensor(0.0 if self._pending[0].done() else 1.0)
        if dist.is_initialized():  # on the training's group: the writer thread may be using its own right now
            done = done.to(_device_of_default_group())
            dist.all_reduce(done, op=dist.ReduceOp.MAX)
        return self.wait() if done.item() == 0 else None

    def abandon(self) -> None:
        """On an error: let the background write end (the process must not exit under it); publish nothing."""
        if self._pending is not None:
            try:
                self._pending[0].result()
            except _LOAD_ERRORS:
                pass
            self._pending = None


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(path: str) -> Dict[str, Any]:
    meta_path = os.path.join(path, META_FILE)
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {META_FILE}: {e}") from None


def verify_checkpoint(path: str, meta: Dict[str, Any], world_size: int) -> Optional[str]:
    """What is wrong with the files of checkpoint `path` (None: all present with the sizes written).

    Checkpoints written before meta.json listed its files are not checked here (DCP's own errors still are).
    """
    files = meta.get("files")
    if files is None:
        return None
    problems = []
    for name, size in files.items():
        if name.startswith("rng_rank") and int(name[len("rng_rank"):-len(".pt")]) >= world_size:
            continue  # resuming on fewer ranks: those ranks' RNG states are not used
        p = os.path.join(path, name)
        if not os.path.exists(p):
            problems.append(f"{name} is missing")
        elif os.path.getsize(p) != size:
            problems.append(f"{name} has {os.path.getsize(p)} bytes, {size} were written")
    return "; ".join(problems) or None


def _agree(problem: Optional[str]) -> Optional[str]:
    """Rank 0's verdict for every rank, so all ranks try the same checkpoints."""
    if not dist.is_initialized():
        return problem
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from `path`; return meta.json's contents.

    Raises CheckpointError naming what is wrong. A failed DCP load can leave the model and optimizer partly
    overwritten: the caller must load another checkpoint fully (as `load_newest` does) or give up.
    """
    meta = read_meta(path)
    problem = _agree(verify_checkpoint(path, meta, _world_size()) if _rank() == 0 else None)
    if problem:
        raise CheckpointError(problem)
    # (a missing rng_rank<R>.pt of a rank that saved is one of the problems above: without it no exact resume)
    rng_path = os.path.join(path, f"rng_rank{_rank()}.pt")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with single_process_dcp():
            dcp.load(state, checkpoint_id=path)
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"DCP cannot load the model/optimizer state: {_short(e)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    # torch takes every param-group setting from the saved groups, kernel choices included; how the optimizer runs
    # (fused / foreach) is the current config's choice (e.g. optim.clip_in_optimizer needs the fused kernel)
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]
    if os.path.exists(rng_path):  # absent when resuming at a larger world size: keep the seeded RNG
        try:
            set_rng_state(torch.load(rng_path, weights_only=False))
        except _LOAD_ERRORS as e:
            raise CheckpointError(f"cannot read {os.path.basename(rng_path)}: {_short(e)}") from None
    return meta


def _short(e: BaseException) -> str:
    """The first line of an error (DCP's wrap every rank's traceback into one message)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _set_aside(path: str) -> None:
    target, n = path + ".corrupt", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.corrupt{n}"
    os.replace(path, target)


def load_newest(
    candidates: List[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer, warn: Callable[[str], None]
) -> Tuple[str, Dict[str, Any]]:
    """Load the newest checkpoint of `candidates` (oldest first) that loads; warn about each that does not.

    Each attempt loads every tensor of the model and optimizer, so a later success overwrites whatever a failed
    attempt left behind. A checkpoint that fails is renamed `step_N.corrupt` (kept for inspection, never picked up
    or counted by `keep` again). Raises CheckpointError when none loads.
    """
    failures = []
    for path in reversed(candidates):
        try:
            meta = load_checkpoint(path, model, optimizer)
        except CheckpointError as e:
            failures.append(f"{path}: {e}")
            warn(f"warning: checkpoint {path} is unusable ({e}); trying the previous one")
            _barrier()
            if _rank() == 0 and os.path.isdir(path):
                _set_aside(path)
            _barrier()
            continue
        return path, meta
    raise CheckpointError("no usable checkpoint to resume from:\n  " + "\n  ".join(failures)
                          + "\n(set checkpoint.resume=false or use a new run_dir to start over)")
