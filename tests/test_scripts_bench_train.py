"""scripts/bench_train.py: which part of the step a profiled kernel is counted in."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.bench_train import classify  # noqa: E402
from train.config import load_config  # noqa: E402


def test_kernels_are_counted_in_their_parts():
    cfg = load_config(os.path.join(ROOT, "configs", "memory_373m.yaml"))
    m = cfg.model
    cases = [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7",
         "aten::_scaled_dot_product_cudnn_attention_backward", [], "attention"),
        # FlashAttention-4's kernels are CuTe kernels: "cutlass" in the name must not make them matmuls
        ("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at_0",
         "mnemo::flash4_backward", [], "attention"),
        ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "aten::mm", [16384, m.hidden_dim], "FFN matmuls"),
        ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8", "aten::mm", [16384, m.vocab_size],
         "output matmuls"),
        ("_segment_bwd_kernel", "", [], "memory lookup"),
        ("triton_poi_fused_add_mul_0", "", [], "fused elementwise (compiled)"),
    ]
    for kernel, op, dims, part in cases:
        assert classify(kernel, op, dims, cfg) == part, (kernel, part)
