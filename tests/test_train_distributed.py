"""Distributed layouts on CPU (gloo, ranks spawned from pytest) equal a single process on the same global batch.

Each layout runs 5 optimizer steps on fixed random batches: rank r takes rows [r*B, (r+1)*B) of the global
batch, the single process takes all of it. Losses and every parameter (gathered from its shards) must match
within fp32 tolerance. The single process runs the ranks' code path (eager or compiled, with or without activation
checkpointing) on one thread like each rank, so only the split of the batch over ranks separates the two.
"""
import contextlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from _dist_helpers import start_ranks
from _train_helpers import STEP_SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, B, L = 5, 2, 16

# Adam divides each gradient element by its running RMS. On an element whose gradient is near zero that turns a
# rounding-level difference (the batch split changes the summation order, and CPU kernels round differently per
# instruction set, AVX2 or AVX-512) into a visible update difference, while a gradient off by a constant factor
# (a missing 1/W) is mostly normalised away. With eps far above every gradient, Adam's update is lr * momentum,
# linear in the gradient: rounding differences stay at rounding level on every CPU and a wrong scale shows in full.
# Clipping, weight decay and the schedule still run. BENCHMARKS.md has the measured margins.
LINEAR_ADAM = ["optim.eps=1.0", "optim.lr=1.0", "optim.value_lr=1.0"]
# The trainer's Adam (tests/_train_helpers.py STEP_SMALL), for the bf16 test, which compares whole tensors against
# bf16's own noise as Adam turns it into steps of about lr.
TRAINER_ADAM = ["optim.eps=1e-8", "optim.lr=1e-2", "optim.value_lr=3e-2"]


def global_batches(world: int):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 4096, (world * B, L + 1), generator=g) for _ in range(STEPS)]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_layout(world: int, rank: int, overrides, grad_accum: int = 1, probe=None):
    """Build, parallelize and train exactly as train.loop does; return (losses, {name: full param}).

    `probe(rt, model)`, when given, is called once before training (to wrap hooks that record what happens)."""
    from train.builder import build_training
    from train.config import load_config
    from train.runtime import setup_runtime
    from train.step import train_step

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + LINEAR_ADAM + list(overrides))
    rt = setup_runtime(cfg)
    state = build_training(cfg, rt)
    model, opt, sched = state.model, state.optimizer, state.scheduler
    if probe is not None:
        probe(rt, model)
    losses = []
    for batch in global_batches(world if rt.world_size > 1 else world):
        mine = batch[rank * B:(rank + 1) * B] if rt.world_size > 1 else batch
        micro = list(mine.chunk(grad_accum))
        loss, _ = train_step(model, opt, sched, micro, cfg, rt)
        losses.append(float(loss))
    params = {_canonical(n): _full(p.detach()).clone() for n, p in model.named_parameters()}
    return losses, params


def _canonical(name: str) -> str:
    """A parameter's name without the wrappers of compile and activation checkpointing."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def _worker(rank, world, init_file, overrides, out, grad_accum=1, probe=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = run_layout(world, rank, overrides, grad_accum, probe)
        if probe is not None:
            result = result + (probe.record,)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()  # no rank tears its gloo pairs down while another still uses them (SIGABRT)
    finally:
        dist.destroy_process_group()


def run_distributed(world, overrides, grad_accum=1, probe=None):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        start_ranks(_worker, (world, os.path.join(tmp, "init"), overrides, out, grad_accum, probe), world)
        return torch.load(out)


def code_path(overrides):
    """The overrides that choose which code runs (compile, activation checkpointing), not how work is split."""
    return [o for o in overrides if o.startswith("train.")]


def reference(world, grad_accum=1, overrides=()):
    """One process on the whole global batch, running the same code as each rank: the same `train.*` settings
    (inductor's CPU kernels round differently from eager ones, and differently per instruction set, so compiled
    ranks against an eager reference compare the CPU model, not the sharding) and one intra-op thread."""
    os.environ.pop("WORLD_SIZE", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_layout(world, 0, list(overrides), grad_accum=grad_accum)
    finally:
        torch.set_num_threads(threads)
        if any(o.startswith("train.compile") for o in overrides):
            torch._dynamo.reset()  # no compiled blocks or recompile counts leak into later tests


def assert_same(result, ref, atol=1e-5):
    losses, params = result
    ref_losses, ref_params = ref
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert params.keys() == ref_params.keys()
    for name in ref_params:
        # A callable keeps the default message (greatest absolute and relative difference) and adds the name.
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-4, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, overrides",
    [
        (2, []),  # FSDP over 2, values replicated (MP = 1)
        (2, ["dist.memory_parallel=2"]),  # FSDP + MP = 2: no value-gradient collective
        # two blocks per FSDP unit, gathered parameters kept until backward
        (2, ["dist.memory_parallel=2", "dist.blocks_per_unit=2", "dist.reshard_after_forward=false"]),
        # all at once, in the trainer's order: compile, activation checkpointing, FSDP + MP = 2
        (2, ["dist.memory_parallel=2", "train.activation_checkpointing=true", "train.compile=true"]),
        (4, ["dist.memory_parallel=4"]),
        (4, ["dist.replicate=2", "dist.memory_parallel=2"]),  # HSDP 2 x 2, MP = 2
        # 8-GPU layouts: FSDP 8 with MP = 8, HSDP 2 x 4 with MP = 4
        (8, ["dist.memory_parallel=8"]),
        (8, ["dist.replicate=2", "dist.memory_parallel=4"]),
    ],
    ids=["fsdp2", "fsdp2-mp2", "fsdp2-mp2-units2", "fsdp2-mp2-ac-compile", "fsdp4-mp4", "hsdp2x2-mp2", "fsdp8-mp8",
         "hsdp2x4-mp4"],
)
def test_layout_matches_single_process(world, overrides):
    assert_same(run_distributed(world, overrides), reference(world, overrides=code_path(overrides)))


@pytest.mark.slow
def test_row_sparse_value_optimizer_on_column_shards():
    """Row-wise Adagrad on a value table split by columns (MP = 2): each shard must step with the FULL row's mean
    square (all-reduced), so the shards together equal the single process."""
    opt = ["optim.value_optimizer=rowwise_adagrad"]
    assert_same(run_distributed(2, ["dist.memory_parallel=2"] + opt), reference(2, overrides=opt))


@pytest.mark.slow
def test_bf16_layout_tracks_single_process():
    """bf16 autocast + FSDP bf16 parameters and bf16 gradient reduction + MP = 2. This layout once failed at the first
    backward ("mixed torch.Tensor and DTensor") while fp32 passed; bf16 rounding allows only loose agreement."""
    losses, params = run_distributed(2, TRAINER_ADAM + ["dist.memory_parallel=2", "train.precision=bf16",
                                                        "dist.reduce_dtype=bf16"])
    os.environ.pop("WORLD_SIZE", None)
    ref_losses, ref_params = run_layout(2, 0, TRAINER_ADAM + ["train.precision=bf16"])
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    assert losses[-1] < losses[0]
    # bf16 rounding noise: the same single process in fp32. Adam turns tiny gradient differences into +-lr
    # steps, so whole tensors are compared, each against that noise, not elementwise.
    _, fp32_params = run_layout(2, 0, TRAINER_ADAM)
    for name in ref_params:
        err = (params[name] - ref_params[name]).norm()
        noise = (fp32_params[name] - ref_params[name]).norm()
        assert err <= 2 * noise + 1e-3 * ref_params[name].norm(), name


def test_grad_accumulation_equals_full_batch():
    assert_same(reference(2, grad_accum=2), reference(2, grad_accum=1))


class AccumulationProbe:
    """Records, per micro-step, whether any parameter held a gradient right after it (FSDP2 puts a gradient on its
    sharded parameters only when it reduce-scatters), and how many value-gradient collectives ran per step."""

    def __init__(self):
        self.record = {"grads_after_micro_step": [], "memory_collectives": 0}

    def __call__(self, rt, model):
        inner = rt.no_sync

        @contextlib.contextmanager
        def no_sync(model_, last):
            with inner(model_, last):
                yield
            has_grad = any(p.grad is not None for n, p in model_.named_parameters() if "values" not in n)
            self.record["grads_after_micro_step"].append((last, has_grad))

        rt.no_sync = no_sync
        sync = rt.sync_value_grads

        def sync_value_grads(model_):
            before = rt.memory_comm.calls
            sync(model_)
            self.record["memory_collectives"] += rt.memory_comm.calls - before

        rt.sync_value_grads = sync_value_grads


@pytest.mark.slow
def test_distributed_accumulation_reduces_once_per_step():
    """FSDP 2 with replicated values (MP = 1), 2 micro-steps: equal to one process on the full batch; no FSDP
    reduction before the last micro-step; the value table shared by both memory layers gets one gradient
    all-reduce per optimizer step, not one per layer use or per micro-step."""
    *result, record = run_distributed(2, [], grad_accum=2, probe=AccumulationProbe())
    assert_same(tuple(result), reference(2))
    assert record["grads_after_micro_step"] == [(False, False), (True, True)] * STEPS
    assert record["memory_collectives"] == STEPS


def test_impossible_layouts_fail_with_the_key():
    from train.config import ConfigError, load_config
    from train.distributed import check_layout

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + ["dist.memory_parallel=3"])
    with pytest.raises(ConfigError, match="dist.memory_parallel"):
        check_layout(cfg, 6)  # 3 divides 6 but not the value dim 32
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + ["dist.replicate=3"])
    with pytest.raises(ConfigError, match="dist.replicate"):
        check_layout(cfg, 4)
