"""Benchmark the memory-layer ops (Triton kernels vs the plain-PyTorch reference) on one CUDA GPU.

    PYTHONUNBUFFERED=1 python scripts/bench_memory.py [--out DIR] [--sweep] [--bwd-sweep] [--no-reference] [--only NAME,...]
        [--slots FILE]

Prints one table: ms (triton.testing.do_bench median) and effective TB/s for ours and the reference, against a
device-to-device copy ceiling measured in the same run. Byte model per shape (the fewest bytes an exact
implementation must move): forward = value rows read (T*S*D) + indices/weights + output; backward adds the
value rows read again for the weight gradient (T*S*D), the output gradient, and the touched rows' gradient
written (U*D, U = distinct rows). The dense value gradient also writes zeros to untouched rows; that extra
is reported as its own column. Needs only torch + triton (no omegaconf).
The "memory layer" rows: a functional Memory+ layer in eager mode (fp32 input and weights under autocast), and the
model's own MemoryLayer compiled as the trainer runs a block (bf16 input, bf16 table with its gradient in .grad).
--sweep: launch configs at the headline shapes; --bwd-sweep: the lookup backward's (BLOCK_P, BLOCK_D, warps) at the
trainers' shapes, dense and accumulated gradient (what ops/triton_lookup.bwd_config is fitted to).
--slots FILE (from scripts/capture_slots.py): the lookup backward on the rows a training step read, its layers in the
trainer's order (the first writes the dense gradient, the others add to it), and the merged pass over all of them
(no grad_w; with and without the hot rows' runs), beside the same launches on uniform random rows.
"""
import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from ops import reference  # noqa: E402
from ops import triton_lookup, triton_search  # noqa: E402

N_ROWS = 1 << 20  # 1024**2 slots


def bench(fn, rep=200):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_ceiling():
    src = torch.randn(1 << 30, device="cuda", dtype=torch.float32)  # 4 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep=300)
    del src, dst
    return 2 * (1 << 32) / (ms * 1e-3) / 1e12


def lookup_inputs(T, S, D, dtype=torch.bfloat16, idx_dtype=torch.int64, n_rows=N_ROWS):
    torch.manual_seed(0)
    idx = torch.randint(0, n_rows, (T, S), device="cuda", dtype=idx_dtype)
    w = torch.randn(T, S, device="cuda", dtype=torch.float32).softmax(-1).requires_grad_()
    v = (torch.randn(n_rows, D, device="cuda", dtype=dtype) * 0.02).requires_grad_()
    g = torch.randn(T, D, device="cuda", dtype=dtype)
    return idx, w, v, g


def lookup_bytes(idx, v, bwd, n_rows=N_ROWS):
    T, S = idx.shape
    D, e = v.shape[1], v.element_size()
    fwd = T * S * D * e + T * S * (idx.element_size() + 4) + T * D * e
    if not bwd:
        return fwd, 0
    U = torch.unique(idx).numel()
    b = fwd + T * S * D * e + T * D * e + T * S * (idx.element_size() + 4) * 2 + U * D * e
    return b, (n_rows - U) * D * e


def run_lookup(name, T, S, D, bwd, args, rows, ceiling, sparse=False, idx_dtype=torch.int64):
    idx, w, v, g = lookup_inputs(T, S, D, idx_dtype=idx_dtype)
    nbytes, zero_bytes = lookup_bytes(idx, v, bwd)

    def ours():
        out = triton_lookup.memory_lookup(idx, w, v)
        if bwd:
            if sparse:
                triton_lookup.memory_lookup_backward(g, idx, w.detach(), v.detach(), sparse=True)
            else:
                torch.autograd.grad(out, [w, v], g)

    def ref():
        out = reference.memory_lookup(idx, w, v)
        if bwd:
            torch.autograd.grad(out, [w, v], g)

    ms = bench(ours)
    ms_ref = None
    if args.reference and not sparse:
        try:
            ms_ref = bench(ref, rep=50)
        except torch.OutOfMemoryError:
            ms_ref = None
        torch.cuda.empty_cache()
    rows.append(dict(name=name, ms=ms, ms_ref=ms_ref, bytes=nbytes, zero_bytes=0 if sparse else zero_bytes,
                     floor_ms=nbytes / (ceiling * 1e12) * 1e3))
    del idx, w, v, g
    torch.cuda.empty_cache()


def run_captured(path, rows):
    """The lookup backward over a training step's captured slots (one launch per layer, as the trainer runs them on
    one shared table: the first writes the dense gradient, the rest add to it), and over uniform random rows of the
    same shapes (in the reference column)."""
    data = torch.load(path)
    slots = [s.cuda() for _, s in sorted(data["slots"].items())]
    N, D = data["n_slots"], data["v_dim"]
    torch.manual_seed(0)
    v = (torch.randn(N, D, device="cuda") * 0.02).to(torch.bfloat16)
    ws = [torch.randn(s.shape, device="cuda").softmax(-1) for s in slots]
    gs = [torch.randn(s.shape[0], D, device="cuda").to(torch.bfloat16) for s in slots]
    uniform = [torch.randint(0, N, s.shape, device="cuda", dtype=s.dtype) for s in slots]

    def layers(indices):
        _, gv = triton_lookup.lookup_backward(gs[0], indices[0], ws[0], v)
        for g, i, w in zip(gs[1:], indices[1:], ws[1:]):
            triton_lookup.lookup_backward(g, i, w, v, accumulate_into=gv)

    each = [bench(lambda: triton_lookup.lookup_backward(g, i, w, v)) for g, i, w in zip(gs, slots, ws)]
    T, S = slots[0].shape
    rows.append(dict(name=f"lookup bwd, captured slots ({len(slots)} layers of {T}x{S}x{D}) [ref column = uniform rows]",
                     ms=bench(lambda: layers(slots)), ms_ref=bench(lambda: layers(uniform)),
                     bytes=0, zero_bytes=0, floor_ms=None,
                     note=f"{os.path.basename(path)}; each layer alone, dense: " + " / ".join(f"{m:.3f}" for m in each)))
    # The merged pass (ops/lookup_into_grad.py, merge): every layer's pairs in one launch without grad_w, as the
    # trainer runs it for a shared bf16 table; with its hot rows summed in runs (the default) and without (run=0).
    g_all, w_all = torch.cat(gs), torch.cat(ws)
    both = {"captured": torch.cat(slots), "uniform": torch.cat(uniform)}

    def merged(kind, run=None):
        triton_lookup.lookup_backward(g_all, both[kind], w_all, v, compute_gw=False, run=run)

    rows.append(dict(name=f"merged value pass, captured slots ({len(slots)} layers of {T}x{S}x{D}) [ref column = uniform rows]",
                     ms=bench(lambda: merged("captured")), ms_ref=bench(lambda: merged("uniform")),
                     bytes=0, zero_bytes=0, floor_ms=None,
                     note=f"without the hot rows' runs: {bench(lambda: merged('captured', 0)):.3f} / uniform "
                          f"{bench(lambda: merged('uniform', 0)):.3f}"))
    del v, ws, gs, slots, uniform, g_all, w_all, both
    torch.cuda.empty_cache()


def search_impl(kind):
    """The search a row measures: "auto" (what the trainer runs: the compiled CUDA top-k where it builds) or
    "triton" (the Triton kernel)."""
    import ops

    if kind == "triton":
        return triton_search.product_key_search
    return lambda q, k1, k2, knn: ops.product_key_search(q, k1, k2, knn, backend="auto")


def run_search(name, T, bwd, args, rows, ceiling, dtype=torch.bfloat16, H=4, n_keys=1024, half=256, knn=32,
               impl="triton"):
    torch.manual_seed(0)
    q = torch.randn(T, H, 2 * half, device="cuda", dtype=dtype).requires_grad_()
    k1 = torch.randn(H, n_keys, half, device="cuda").requires_grad_()
    k2 = torch.randn(H, n_keys, half, device="cuda").requires_grad_()

    def mk(fn):
        def f():
            s, _ = fn(q, k1, k2, knn)
            if bwd:
                torch.autograd.grad(s, [q, k1, k2], torch.ones_like(s))
        return f

    ms = bench(mk(search_impl(impl)))
    ms_ref = bench(mk(reference.product_key_search), rep=50) if args.reference else None
    nbytes = q.numel() * q.element_size() + 2 * k1.numel() * 4 + T * H * knn * 12
    flops = 2 * T * H * 2 * n_keys * half
    rows.append(dict(name=name, ms=ms, ms_ref=ms_ref, bytes=nbytes, zero_bytes=0, floor_ms=None,
                     tflops=flops / (ms * 1e-3) / 1e12))


def old_search_backward(grad_scores, indices, query, keys1, keys2):
    """The previous search backward (before the dense-row GEMMs), kept here to time against in the same run:
    per half a lookup forward with the sub-key table as values and the lookup's sorted value gradient."""
    T, H, k_dim = query.shape
    NK, half = keys1.shape[1], keys1.shape[2]
    knn = indices.shape[-1]
    g = grad_scores.reshape(T * H, knn)
    head = torch.arange(H, device=indices.device).view(1, H, 1) * NK
    rows1 = (indices // NK + head).reshape(T * H, knn)
    rows2 = (indices % NK + head).reshape(T * H, knn)
    q = query.reshape(T * H, k_dim)
    k1 = keys1.reshape(H * NK, half)
    k2 = keys2.reshape(H * NK, half)
    gq = torch.empty((T * H, k_dim), dtype=query.dtype, device=query.device)
    triton_lookup.lookup_forward(rows1, g, k1, out=gq[:, :half])
    triton_lookup.lookup_forward(rows2, g, k2, out=gq[:, half:])
    _, gk1 = triton_lookup.lookup_backward(q[:, :half], rows1, g, k1, compute_gw=False)
    _, gk2 = triton_lookup.lookup_backward(q[:, half:], rows2, g, k2, compute_gw=False)
    return gq.view(T, H, k_dim), gk1.view(H, NK, half), gk2.view(H, NK, half)


def run_search_parts(T, rows, H=4, n_keys=1024, half=256, knn=32):
    """The search backward alone, new vs previous, same inputs."""
    torch.manual_seed(0)
    q = torch.randn(T, H, 2 * half, device="cuda", dtype=torch.bfloat16)
    k1 = torch.randn(H, n_keys, half, device="cuda")
    k2 = torch.randn(H, n_keys, half, device="cuda")
    _, i = triton_search.search_forward(q, k1, k2, knn)
    g = torch.randn(T, H, knn, device="cuda")
    ms_b = bench(lambda: triton_search.search_backward(g, i, q, k1, k2))
    ms_o = bench(lambda: old_search_backward(g, i, q, k1, k2))
    a = triton_search.search_backward(g, i, q, k1, k2)
    b = old_search_backward(g, i, q, k1, k2)
    rel = [((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(a, b)]
    rows.append(dict(name="search bwd only, dense rows + GEMMs vs previous (sorted lookups) [ref column = previous]",
                     ms=ms_b, ms_ref=ms_o, bytes=0, zero_bytes=0, floor_ms=None,
                     note="rel. diff gq/gk1/gk2 " + "/".join(f"{r:.1e}" for r in rel)))


def run_layer(name, T, args, rows, ceiling, dim=1024, H=4, n_keys=1024, k_dim=512, knn=32, impl="auto"):
    """Whole Memory+ layer fwd+bwd under bf16 autocast: query proj + search + softmax + lookup + swilu."""
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(T, dim, device=dev, requires_grad=True)
    wq = (torch.randn(H * k_dim, dim, device=dev) * dim ** -0.5).requires_grad_()
    k1 = torch.randn(H, n_keys, k_dim // 2, device=dev).requires_grad_()
    k2 = torch.randn(H, n_keys, k_dim // 2, device=dev).requires_grad_()
    vals = (torch.randn(N_ROWS, dim, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    w1 = (torch.randn(dim, dim, device=dev) * dim ** -0.5).requires_grad_()
    w2 = (torch.randn(dim, dim, device=dev) * dim ** -0.5).requires_grad_()
    hidden = 2816
    f1 = (torch.randn(hidden, dim, device=dev) * dim ** -0.5).requires_grad_()
    f3 = (torch.randn(hidden, dim, device=dev) * dim ** -0.5).requires_grad_()
    f2 = (torch.randn(dim, hidden, device=dev) * hidden ** -0.5).requires_grad_()
    F = torch.nn.functional

    def layer(search, lookup):
        def f():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                q = F.linear(x, wq).view(T, H, k_dim)
                s, i = search(q, k1, k2, knn)
                wts = s.softmax(-1).view(T, H * knn)
                y = lookup(i.view(T, H * knn), wts, vals)
                out = F.linear(y * F.silu(F.linear(x, w1)), w2)
            torch.autograd.grad(out.float().sum(), [x, wq, k1, k2, vals, w1, w2])
        return f

    def ffn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = F.linear(F.silu(F.linear(x, f1)) * F.linear(x, f3), f2)
        torch.autograd.grad(out.float().sum(), [x, f1, f2, f3])

    ms = bench(layer(search_impl(impl), triton_lookup.memory_lookup))
    ms_ref = bench(layer(reference.product_key_search, reference.memory_lookup), rep=50) if args.reference else None
    rows.append(dict(name=name, ms=ms, ms_ref=ms_ref, bytes=0, zero_bytes=0, floor_ms=None,
                     note=f"SwiGLU FFN same dim: {bench(ffn):.2f} ms"))


def run_module(name, T, args, rows, dim=1024, H=4, n_keys=1024, k_dim=512, knn=32):
    """The model's own Memory+ layer at its initialisation (model.memory.MemoryLayer: qk-norm, swilu, a bf16 table
    whose gradient goes into .grad) fwd+bwd the way the trainer runs a block: compiled, bf16 autocast, a unit-scale
    bf16 input (a normed residual); against the same module eager. How concentrated its slots are (the note) sets
    much of the lookup backward's time."""
    from model import MemoryConfig, ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(dim=dim, n_layers=1, n_heads=16, vocab_size=256,
                      memory=MemoryConfig(layers=[0], n_keys=n_keys, heads=H, knn=knn, k_dim=k_dim, share_values=False,
                                          value_dtype="bfloat16"))
    layer = Transformer(cfg).layers[0].memory.cuda()  # the trainer's initialisation of every parameter
    x = torch.randn(T, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(T, dim, device="cuda", dtype=torch.bfloat16)
    params = list(layer.parameters())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reads = torch.bincount(layer.search(x)[1].flatten(), minlength=n_keys ** 2)

    def step(module):
        def f():
            for p in params:
                p.grad = None  # as the trainer's zero_grad: the table's gradient is written whole each step
            x.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = module(x)
            out.backward(g)
        return f

    compiled = step(torch.compile(layer))
    for _ in range(3):
        compiled()  # compile outside the timing
    rows.append(dict(name=name, ms=bench(compiled), ms_ref=None, bytes=0, zero_bytes=0, floor_ms=None,
                     note=f"the same module eager: {bench(step(layer)):.2f} ms; rows read {int((reads > 0).sum())} of "
                          f"{n_keys ** 2}, most pairs on one row {int(reads.max())}"))


def pair_segments(idx):
    """The lookup backward's work before its kernels (the dense form with the weights' gradient): sort the pairs,
    bound each touched row's."""
    sorted_rows, _ = triton_lookup._sort_pairs(idx, N_ROWS)
    return triton_lookup._segments(sorted_rows, N_ROWS)


def sweep(out_lines):
    """Launch-config sweep at the headline shapes (used to pick the defaults)."""
    def log(line):
        out_lines.append(line)
        print(line)

    def each(label, cfgs, fn):
        for cfg in cfgs:
            try:
                log(f"{label} cfg={cfg}: {bench(lambda: fn(cfg)):.3f} ms")
            except Exception as e:  # noqa: BLE001 - a config may not fit (shared memory / registers)
                log(f"{label} cfg={cfg}: FAILED {type(e).__name__}: {str(e)[:160]}")
            torch.cuda.empty_cache()

    idx, w, v, g = lookup_inputs(32768, 128, 1024)
    wd, vd = w.detach(), v.detach()
    each("fwd 32768x128x1024 (BS,BD,warps)", [(4, 1024, 4), (2, 1024, 4), (8, 1024, 8), (4, 512, 2)],
         lambda cfg: triton_lookup.lookup_forward(idx, wd, vd, config=cfg))
    each("bwd 32768x128x1024 (BP,BD,warps)", [None, (4, 512, 2), (2, 512, 2), (8, 512, 2), (4, 1024, 4), (2, 1024, 4),
                                              (4, 256, 1), (8, 256, 1), (2, 256, 1)],
         lambda cfg: triton_lookup.lookup_backward(g, idx, wd, vd, config=cfg))
    log(f"  sort+segments only: {bench(lambda: pair_segments(idx)):.3f} ms")
    del idx, w, v, g, wd, vd
    torch.cuda.empty_cache()
    idx, w, v, g = lookup_inputs(262144, 128, 128)
    wd, vd = w.detach(), v.detach()
    each("fwd 262144x128x128", [None, (32, 128, 4), (16, 128, 2), (32, 128, 2)],
         lambda cfg: triton_lookup.lookup_forward(idx, wd, vd, config=cfg))
    each("bwd 262144x128x128", [None, (8, 128, 1), (16, 128, 1), (16, 128, 2), (32, 128, 4), (4, 128, 1)],
         lambda cfg: triton_lookup.lookup_backward(g, idx, wd, vd, config=cfg))
    log(f"  sort+segments only: {bench(lambda: pair_segments(idx)):.3f} ms")
    del idx, w, v, g, wd, vd
    torch.cuda.empty_cache()
    idx, w, v, g = lookup_inputs(4096, 32, 4096)
    wd, vd = w.detach(), v.detach()
    each("bwd sparse 4096x32x4096", [None, (1, 512, 2), (1, 1024, 4), (1, 2048, 8), (2, 512, 2)],
         lambda cfg: triton_lookup.lookup_backward(g, idx, wd, vd, config=cfg, sparse=True))
    each("bwd dense 4096x32x4096", [None, (1, 1024, 4)],
         lambda cfg: triton_lookup.lookup_backward(g, idx, wd, vd, config=cfg))
    del idx, w, v, g, wd, vd
    torch.cuda.empty_cache()
    q = torch.randn(32768, 4, 512, device="cuda", dtype=torch.bfloat16)
    k1 = torch.randn(4, 1024, 256, device="cuda")
    k2 = torch.randn(4, 1024, 256, device="cuda")
    each("search fwd bf16 (BT,BN,warps,stages)", [None, (128, 32, 8, 1), (64, 32, 4, 1), (64, 64, 4, 1),
                                                  (128, 128, 8, 1), (64, 64, 8, 1)],
         lambda cfg: triton_search.search_forward(q, k1, k2, 32, config=cfg))
    qf = q.float()
    each("search fwd fp32", [None, (16, 64, 4, 1), (64, 64, 8, 1), (32, 32, 4, 1)],
         lambda cfg: triton_search.search_forward(qf, k1, k2, 32, config=cfg))


# (T, S, D, value dtype): the 373M trainer's 16384 tokens, the issue's 32768, the 1.3B presets' 8192 and 65536
# tokens of 2048 columns, 4096-column tables, short rows, an fp32 table
BWD_SWEEP_SHAPES = [(16384, 128, 1024, torch.bfloat16), (32768, 128, 1024, torch.bfloat16),
                    (8192, 128, 2048, torch.bfloat16), (65536, 128, 2048, torch.bfloat16),
                    (8192, 128, 4096, torch.bfloat16), (4096, 32, 4096, torch.bfloat16),
                    (262144, 128, 128, torch.bfloat16), (16384, 128, 1024, torch.float32)]


def bwd_sweep(out_lines):
    """lookup_backward alone (sort included) per launch config: the default, one pair per step at chunk widths of
    8, 16 and 32 columns per thread, and two pairs per step; ms dense / ms accumulated into an existing gradient."""
    for T, S, D, dtype in BWD_SWEEP_SHAPES:
        idx, w, v, g = lookup_inputs(T, S, D, dtype=dtype)
        wd, vd = w.detach(), v.detach()
        acc = torch.zeros_like(vd)
        e = vd.element_size()
        default = triton_lookup.bwd_config(T * S, min(T * S, N_ROWS), D, e)
        cfgs = [default]
        for block_d in (512, 1024, 2048):
            for per_thread in (8, 16, 32):
                warps = block_d // (32 * per_thread)
                if block_d <= D and 1 <= warps <= 8 and (1, block_d, warps) not in cfgs:
                    cfgs.append((1, block_d, warps))
        cfgs.append((2, default[1], default[2]))
        line = f"bwd {T}x{S}x{D} {str(dtype)[6:]} default {default}:"
        for cfg in cfgs:
            dense = bench(lambda: triton_lookup.lookup_backward(g, idx, wd, vd, config=cfg), rep=40)
            into = bench(lambda: triton_lookup.lookup_backward(g, idx, wd, vd, config=cfg, accumulate_into=acc), rep=40)
            line += f" {cfg} {dense:.3f}/{into:.3f}"
        out_lines.append(line)
        print(line, flush=True)
        del idx, w, v, g, wd, vd, acc
        torch.cuda.empty_cache()


def run_value_grad_norm(rows, T=3 * 16384, S=128, D=1024):
    """The merged value pass of a training step (three layers' pairs in one launch writing the whole bf16 gradient, as
    ops/lookup_into_grad.py runs it for memory_373m) with the gradient's squared norm summed by the pass
    (sum_squares_out), against the pass and then the separate reduction the gradient-norm clip ran before (ref column).
    Uniform random rows."""
    idx, w, v, g = lookup_inputs(T, S, D)
    w, v = w.detach(), v.detach()
    sq = torch.empty((), device="cuda")

    def merged_pass(**out):
        return triton_lookup.lookup_backward(g, idx, w, v, compute_gw=False, **out)[1]

    def separate():
        torch.linalg.vector_norm(merged_pass(), 2.0, dtype=torch.float32)

    pass_only = bench(merged_pass)
    rows.append(dict(name=f"merged value pass + grad norm {T}x{S}x{D} [ref column = the pass, then a separate norm]",
                     ms=bench(lambda: merged_pass(sum_squares_out=sq)), ms_ref=bench(separate), bytes=0, zero_bytes=0,
                     floor_ms=None,
                     note=f"the pass alone: {pass_only:.3f}"))
    del idx, w, v, g
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--bwd-sweep", action="store_true")
    ap.add_argument("--no-reference", dest="reference", action="store_false")
    ap.add_argument("--only", default="")
    ap.add_argument("--slots", default=None, help="slots captured by scripts/capture_slots.py")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench_memory.py needs a CUDA GPU"
    card = torch.cuda.get_device_name()
    print(f"card: {card}; torch {torch.__version__}; triton {triton.__version__}")
    sweep_lines = []
    if args.sweep:
        sweep(sweep_lines)
    if args.bwd_sweep:
        bwd_sweep(sweep_lines)
    ceiling = copy_ceiling()
    print(f"device-to-device copy ceiling: {ceiling:.2f} TB/s")
    rows = []
    only = set(filter(None, args.only.split(",")))
    cases = [
        ("lookup fwd 32768x128x1024", lambda: run_lookup("lookup fwd 32768x128x1024", 32768, 128, 1024, False, args, rows, ceiling)),
        ("lookup fwd 32768x128x1024 int32", lambda: run_lookup("lookup fwd 32768x128x1024 int32", 32768, 128, 1024, False, args, rows, ceiling, idx_dtype=torch.int32)),
        ("lookup fwd 32768x128x1536", lambda: run_lookup("lookup fwd 32768x128x1536", 32768, 128, 1536, False, args, rows, ceiling)),
        ("lookup fwd 8192x128x4096", lambda: run_lookup("lookup fwd 8192x128x4096", 8192, 128, 4096, False, args, rows, ceiling)),
        ("lookup fwd 4096x32x4096", lambda: run_lookup("lookup fwd 4096x32x4096", 4096, 32, 4096, False, args, rows, ceiling)),
        ("lookup fwd 262144x128x128", lambda: run_lookup("lookup fwd 262144x128x128", 262144, 128, 128, False, args, rows, ceiling)),
        ("lookup fwd+bwd 32768x128x1024", lambda: run_lookup("lookup fwd+bwd 32768x128x1024", 32768, 128, 1024, True, args, rows, ceiling)),
        ("lookup fwd+bwd 8192x128x4096", lambda: run_lookup("lookup fwd+bwd 8192x128x4096", 8192, 128, 4096, True, args, rows, ceiling)),
        ("lookup fwd+bwd 4096x32x4096", lambda: run_lookup("lookup fwd+bwd 4096x32x4096", 4096, 32, 4096, True, args, rows, ceiling)),
        ("lookup fwd+bwd 32768x128x1024 sparse", lambda: run_lookup("lookup fwd+bwd 32768x128x1024 sparse", 32768, 128, 1024, True, args, rows, ceiling, sparse=True)),
        ("lookup fwd+bwd 8192x128x4096 sparse", lambda: run_lookup("lookup fwd+bwd 8192x128x4096 sparse", 8192, 128, 4096, True, args, rows, ceiling, sparse=True)),
        ("lookup fwd+bwd 4096x32x4096 sparse", lambda: run_lookup("lookup fwd+bwd 4096x32x4096 sparse", 4096, 32, 4096, True, args, rows, ceiling, sparse=True)),
        ("lookup fwd+bwd 262144x128x128", lambda: run_lookup("lookup fwd+bwd 262144x128x128", 262144, 128, 128, True, args, rows, ceiling)),
        ("search fwd 32768x4 knn32", lambda: run_search("search fwd 32768x4 knn32", 32768, False, args, rows, ceiling, impl="auto")),
        ("search fwd 32768x4 knn32 triton", lambda: run_search("search fwd 32768x4 knn32 triton", 32768, False, args, rows, ceiling)),
        ("search fwd+bwd 32768x4 knn32", lambda: run_search("search fwd+bwd 32768x4 knn32", 32768, True, args, rows, ceiling, impl="auto")),
        ("search parts 32768x4 knn32", lambda: run_search_parts(32768, rows)),
        ("search fwd 32768x4 knn32 fp32", lambda: run_search("search fwd 32768x4 knn32 fp32", 32768, False, args, rows, ceiling, dtype=torch.float32)),
        ("memory layer fwd+bwd dim1024 32768", lambda: run_layer("memory layer fwd+bwd dim1024 32768", 32768, args, rows, ceiling)),
        ("memory layer fwd+bwd dim1024 32768 triton search", lambda: run_layer("memory layer fwd+bwd dim1024 32768 triton search", 32768, args, rows, ceiling, impl="triton")),
        ("memory layer module compiled dim1024 32768", lambda: run_module("memory layer module compiled dim1024 32768", 32768, args, rows)),
        ("merged value pass + grad norm", lambda: run_value_grad_norm(rows)),
    ]
    cases = [(name, fn) for name, fn in cases if not only or name in only]
    if args.slots:  # asked for by its own flag: --only does not filter it out
        cases.append(("captured slots", lambda: run_captured(args.slots, rows)))
    for name, fn in cases:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on to the next shape
            print(f"{name}: FAILED {type(e).__name__}: {e}")
            rows.append(dict(name=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
            torch.cuda.empty_cache()
        if rows and "error" not in rows[-1]:
            r = rows[-1]
            print(f"  {r['name']}: ours {r['ms']:.3f} ms, ref {r['ms_ref'] if r['ms_ref'] is None else round(r['ms_ref'], 3)} ms")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"card: {card}; torch {torch.__version__}; triton {triton.__version__}; {date}",
             f"copy ceiling (device-to-device, read+write): {ceiling:.2f} TB/s", "",
             "| shape | ours ms | ours TB/s | % of copy ceiling | floor ms | reference ms | speed-up vs ref | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed | | | | | | {r['error']} |")
            continue
        # TB/s only where bytes bound the op (the lookups); the search is bound by its top-k, not by bytes
        tbs = r["bytes"] / (r["ms"] * 1e-3) / 1e12 if r["bytes"] and r.get("floor_ms") else None
        notes = []
        if r.get("zero_bytes"):
            notes.append(f"+{r['zero_bytes'] / 1e9:.2f} GB zeros of the dense grad (not in TB/s)")
        if r.get("tflops"):
            notes.append(f"{r['tflops']:.0f} TFLOP/s of score dots")
        if r.get("note"):
            notes.append(r["note"])
        lines.append("| {} | {:.3f} | {} | {} | {} | {} | {} | {} |".format(
            r["name"], r["ms"], f"{tbs:.2f}" if tbs else "-", f"{100 * tbs / ceiling:.0f}%" if tbs else "-",
            f"{r['floor_ms']:.2f}" if r.get("floor_ms") else "-",
            f"{r['ms_ref']:.2f}" if r.get("ms_ref") else "-",
            f"{r['ms_ref'] / r['ms']:.1f}x" if r.get("ms_ref") else "-", "; ".join(notes)))
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_memory.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(sweep_lines) + "\n")
    with open(os.path.join(args.out, "bench_memory.json"), "w") as f:
        json.dump(dict(card=card, date=date, ceiling_tbs=ceiling, rows=rows, sweep=sweep_lines), f, indent=1)


if __name__ == "__main__":
    main()
