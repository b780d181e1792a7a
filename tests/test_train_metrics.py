"""What a run logs beyond the loss: MFU from the shared FLOP counter, learning rate per parameter group, the
gradient norm by part (dense parameters, value table), and wandb in offline mode with a sweep's group."""
import glob
import json
import os
import time

import pytest
import torch

from _train_helpers import RUN_SMALL, STEP_SMALL
from train.builder import build_model
from train.config import load_config
from train.grad_norm import clip_grad_norm
from train.loop import run
from train.mfu import device_peak_flops, peak_flops_of
from train.runtime import setup_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Training FLOPs per token of configs/tiny.yaml + RUN_SMALL, counted by hand: vocab 4096, dim 64, 2 layers, both
# memory layers (no FFN), 4 heads / 2 KV heads of 16, sequences of 32; memory: 2 heads, knn 4, n_keys 16,
# k_dim 16, values of dim 64, swilu. Forward per token, summed over the two layers:
HAND_FORWARD = (
    2 * 2 * 64 * (64 + 32 + 32 + 64)  # q, k, v, o projections
    + 2 * 2 * 2 * 32 * 64  # attention scores and weighted sum over 32 positions
    + 2 * 2 * 64 * (2 * 16)  # memory query projection: dim -> heads x k_dim
    + 2 * 2 * 2 * (2 * 16 * 8)  # sub-key scores: 2 heads x two halves of 16 keys of 8
    + 2 * 2 * 2 * 4 * 64  # lookup: 2 heads x 4 value rows of 64
    + 2 * (2 * 64 * 64 + 2 * 64 * 64)  # value projection and swilu projection
    + 2 * 64 * 4096  # output projection
)
HAND_FLOPS_PER_TOKEN = 3 * HAND_FORWARD  # forward + backward (twice the forward)


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_mfu_and_group_metrics_in_metrics_jsonl(tmp_path):
    assert HAND_FLOPS_PER_TOKEN == 1904640
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      RUN_SMALL + [f"run_dir={tmp_path}", "train.steps=2", "checkpoint.every=0",
                                   "train.peak_flops=1e12", "optim.value_lr=5e-3"])
    run(cfg)
    recs = _records(tmp_path)
    start = recs[0]
    assert start["step"] == 0 and start["flops_per_token"] == HAND_FLOPS_PER_TOKEN
    with torch.device("meta"):
        from model import Transformer

        assert start["params"] == Transformer(cfg.model).num_parameters()
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["mfu"] == pytest.approx(r["tokens_per_s_per_device"] * HAND_FLOPS_PER_TOKEN / 1e12, rel=1e-12)
        # one rate per parameter group: the value table has its own
        assert r["lr/values"] / r["lr/decay"] == pytest.approx(5e-3 / cfg.optim.lr)
        assert r["lr/no_decay"] == r["lr/decay"] == r["lr"]
        assert r["grad_norm"] ** 2 == pytest.approx(r["grad_norm/dense"] ** 2 + r["grad_norm/values"] ** 2, rel=1e-5)
        assert "peak_mem_gib" not in r  # CPU: no CUDA allocator to ask
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary["step"] == 2 and summary["flops_per_token"] == HAND_FLOPS_PER_TOKEN


def test_evaluation_time_and_share_are_logged(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      RUN_SMALL + [f"run_dir={tmp_path}", "train.steps=3", "train.val_every=1", "checkpoint.every=0"])
    summary = run(cfg)
    evals = [r for r in _records(tmp_path) if "val/loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]  # every step before the last, then the final evaluation
    assert all(r["eval/seconds"] > 0 for r in evals)
    shares = [r["eval/share"] for r in evals]
    assert all(0 < s < 1 for s in shares)
    # cumulative: all evaluation seconds so far over the wall time so far; the summary, taken after the final
    # evaluation, has the same seconds over a longer time
    assert summary["eval_seconds"] == pytest.approx(sum(r["eval/seconds"] for r in evals), rel=1e-9)
    assert 0 < summary["eval_share"] <= shares[-1]


def test_progress_line_shows_a_small_value_norm():
    from train.metrics import format_progress

    line = format_progress({"step": 3, "loss": 7.0, "grad_norm": 1.25, "grad_norm/values": 4.2e-4}, 10)
    assert "gnorm 1.250 (values 0.00042)" in line


def test_peak_flops_from_gpu_name_or_config():
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H200") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("Some Other Accelerator") is None
    assert device_peak_flops(torch.device("cpu"), None) is None  # no MFU on a CPU unless configured
    assert device_peak_flops(torch.device("cpu"), 2e12) == 2e12


@pytest.mark.any_device  # on a GPU, torch's multi-tensor norm takes one dtype per call
def test_sum_of_squares_over_gradients_of_mixed_dtypes():
    from train.grad_norm import _sum_of_squares

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    shapes = [((5,), torch.float32), ((3, 4), torch.bfloat16), ((7,), torch.float32), ((2,), torch.bfloat16)]
    tensors = [torch.randn(shape, generator=g).to(dev, dtype) for shape, dtype in shapes]
    want = sum(float(t.double().pow(2).sum()) for t in tensors)
    assert float(_sum_of_squares(tensors)) == pytest.approx(want, rel=1e-6)


# 1024: the big gradients take the single-reduction path; bfloat16: the value table's gradient is written by the
# lookups' merged pass, which sums its squares (ops.grad_sum_of_squares), and the norm takes that sum
@pytest.mark.parametrize("large,value_dtype", [(None, "float32"), (1024, "float32"), (None, "bfloat16")])
def test_grad_norm_parts_are_the_dense_and_value_norms(large, value_dtype, monkeypatch):
    import ops

    if large is not None:
        import train.grad_norm

        monkeypatch.setattr(train.grad_norm, "_LARGE", large)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      STEP_SMALL + [f"model.memory.value_dtype={value_dtype}"])
    os.environ.pop("WORLD_SIZE", None)
    model = build_model(cfg, setup_runtime(cfg))
    model(torch.randint(0, 4096, (2, 16))).float().pow(2).mean().backward()
    assert (ops.grad_sum_of_squares(model.values.weight) is not None) == (value_dtype == "bfloat16")
    named = [(n, p.grad.to(torch.float32, copy=True)) for n, p in model.named_parameters() if p.grad is not None]
    # by name, independently of the model's own value identification (by type)
    dense = torch.linalg.vector_norm(torch.cat([g.flatten() for n, g in named if n != "values.weight"]))
    values = torch.linalg.vector_norm(torch.cat([g.flatten() for n, g in named if n == "values.weight"]))
    assert float(values) > 0
    total, parts = clip_grad_norm(model, max_norm=0.5 * float(dense))
    assert float(parts["dense"]) == pytest.approx(float(dense), rel=1e-5)
    assert float(parts["values"]) == pytest.approx(float(values), rel=1e-5)
    assert float(total) == pytest.approx(float((dense**2 + values**2).sqrt()), rel=1e-5)
    # the clip still scales every gradient, values included, to the global norm
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for _, p in model.named_parameters()
                                                  if p.grad is not None]))
    assert float(clipped) == pytest.approx(0.5 * float(dense), rel=1e-3)  # up to the 1e-6 guard on the total


@pytest.mark.slow
def test_wandb_offline_run_has_the_sweep_group(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    run_dir = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      RUN_SMALL + [f"run_dir={run_dir}", "train.steps=2", "checkpoint.every=0",
                                   "logging.wandb=offline", "logging.group=my-sweep-group"])
    run(cfg)
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(files) == 1, os.listdir(run_dir)
    # wandb's service process writes the file; on a loaded machine its last records can land just after finish()
    # returns (seen once in CI: only the file header). Wait for them, up to 30 s.
    deadline = time.monotonic() + 30
    while True:
        with open(files[0], "rb") as f:
            data = f.read()
        if (b"my-sweep-group" in data and b"lr/values" in data) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # the run's record (protobuf: strings stored as they are) carries the group and the logged metric names
    assert b"my-sweep-group" in data
    assert b"grad_norm/values" in data and b"lr/values" in data
    assert not any("mfu" in r for r in _records(run_dir))  # CPU without train.peak_flops: no MFU


def _grad_norms(world, rank, overrides):
    """Per-step (total, dense, values) gradient norms of 3 steps on fixed batches, built as the trainer builds."""
    from train.builder import build_training
    from train.step import train_step

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + ["train.steps=3"] + overrides)
    rt = setup_runtime(cfg)
    state = build_training(cfg, rt)
    model, opt, sched = state.model, state.optimizer, state.scheduler
    g = torch.Generator().manual_seed(5)
    norms = []
    for _ in range(cfg.train.steps):
        batch = torch.randint(0, 4096, (2 * world, 17), generator=g)
        mine = batch[2 * rank:2 * (rank + 1)] if rt.world_size > 1 else batch
        _, (total, parts) = train_step(model, opt, sched, [mine], cfg, rt)
        norms.append((float(total), float(parts["dense"]), float(parts["values"])))
    return norms


def _grad_norm_worker(rank, world, init_file, out, overrides):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        norms = _grad_norms(world, rank, overrides)
        if rank == 0:
            torch.save(norms, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_grad_norm_parts_sharded_equal_one_process(tmp_path):
    # FSDP-sharded dense parameters and a column-sharded value table (two meshes, two reductions) give the norms
    # of one process on the same global batch
    from _dist_helpers import start_ranks

    out = str(tmp_path / "norms.pt")
    start_ranks(_grad_norm_worker, (2, str(tmp_path / "init"), out, ["dist.memory_parallel=2"]), 2)
    os.environ.pop("WORLD_SIZE", None)
    ref = _grad_norms(2, 0, [])
    assert torch.load(out) == [pytest.approx(r, rel=1e-4) for r in ref]
