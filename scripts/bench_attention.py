"""Causal SDPA forward + backward by backend at one shape (bf16), on one CUDA GPU.

    python scripts/bench_attention.py [--batch 4 --seq 4096 --heads 16 --head-dim 64]
Prints ms (triton.testing.do_bench median) and TFLOP/s (causal: half the 4·B·H·L²·hd forward products, 2.5x that
backward), and each backend's largest difference to the math backend in fp32 on the same inputs.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    shape = (a.batch, a.heads, a.seq, a.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    fwd_flops = 2 * a.batch * a.heads * a.seq * a.seq * a.head_dim  # causal: half of 4·B·H·L²·hd
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                err = ((out.float() - ref).norm() / ref.norm()).item()

                def step():
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    o.backward(g)

                fwd = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), return_mode="median")
                both = do_bench(step, return_mode="median")
            print(f"{backend.name:22s} fwd {fwd:.3f} ms ({fwd_flops / fwd / 1e9:.0f} TFLOP/s) | fwd+bwd {both:.3f} ms "
                  f"({3.5 * fwd_flops / both / 1e9:.0f} TFLOP/s) | rel. error vs fp32 {err:.2e}")
        except RuntimeError as e:
            print(f"{backend.name:22s} unavailable: {str(e).splitlines()[0][:120]}")


if __name__ == "__main__":
    main()
