"""ops.column_parallel on 2 gloo ranks: the lookup over column slices equals the single-device lookup on the
whole table (output, weight gradient, value-slice gradient), including duplicate slots, and the collective
timer counts every collective of forward and backward."""
import os
import tempfile

import torch
import torch.distributed as dist
from _dist_helpers import start_ranks

T, S, N, D = 5, 6, 7, 8  # tokens per rank, slots per token, table rows, value dim


def _inputs(world):
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, N, (world * T, S), generator=g)
    idx[0] = 3  # every slot of one token on one row
    idx[1, :3] = idx[1, 3:]  # duplicates inside a bag
    w = torch.softmax(torch.randn(world * T, S, generator=g, dtype=torch.float64), -1)
    v = torch.randn(N, D, generator=g, dtype=torch.float64)
    dy = torch.randn(world * T, D, generator=g, dtype=torch.float64)
    return idx, w, v, dy


def _worker(rank, world, init_file, out):
    from ops import reference
    from ops.column_parallel import CollectiveTimer, column_parallel_lookup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        idx, w, v, dy = _inputs(world)
        mine = slice(rank * T, (rank + 1) * T)
        cols = slice(rank * D // world, (rank + 1) * D // world)
        w_mine = w[mine].clone().requires_grad_(True)
        v_mine = v[:, cols].clone().requires_grad_(True)
        timer = CollectiveTimer()
        y = column_parallel_lookup(idx[mine], w_mine, v_mine, dist.group.WORLD, reference.memory_lookup, timer)
        calls_forward = timer.calls
        y.backward(dy[mine])
        result = {"y": y.detach(), "dw": w_mine.grad, "dv": v_mine.grad, "calls": (calls_forward, timer.calls),
                  "ms": timer.read_ms(), "calls_after_read": timer.calls}
        torch.save(result, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_column_parallel_lookup_equals_single_device():
    from ops import reference

    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r")
        start_ranks(_worker, (world, os.path.join(tmp, "init"), out), world)
        results = [torch.load(f"{out}.{r}") for r in range(world)]

    idx, w, v, dy = _inputs(world)
    w, v = w.clone().requires_grad_(True), v.clone().requires_grad_(True)
    y = reference.memory_lookup(idx, w, v)
    y.backward(dy)
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach())
    torch.testing.assert_close(torch.cat([r["dw"] for r in results]), w.grad)
    # each rank's slice gradient covers the tokens of every rank in the group
    torch.testing.assert_close(torch.cat([r["dv"] for r in results], dim=1), v.grad)
    for r in results:
        assert r["calls"] == (3, 5)  # fwd: gather indices, gather weights, return columns; bwd: two all-to-alls
        assert r["ms"] > 0 and r["calls_after_read"] == 0
