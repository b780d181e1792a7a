"""scripts/bench_train.py: which part of the step a profiled kernel is counted in; the memory layers' rows read."""
import os
import sys

import torch

from model.memory import MemoryLayer

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


def _setup(overrides, tmp_path):
    from train.bench_steps import build_steps
    from train.runtime import setup_runtime

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [
        "train.batch_size=2", "data.seq_len=32", "train.compile=false", f"run_dir={tmp_path}/run", *overrides])
    return build_steps(cfg, setup_runtime(cfg), 4)


def test_rows_read_is_each_memory_layers_share_of_rows_in_one_more_step(tmp_path):
    from scripts.bench_train import rows_read

    setup = _setup(["model.memory.layers=[1,3]"], tmp_path)
    setup.step()
    seen = {}
    for name, module in setup.model.named_modules():
        if isinstance(module, MemoryLayer):
            original = module.search
            module.search = lambda x, _f=original, _n=name: seen.setdefault(_n, _f(x))  # the step's own slots
    spread = rows_read(setup)
    assert sorted(spread) == [1, 3] and len(seen) == 2
    for (name, (_, slots)), layer in zip(sorted(seen.items()), sorted(spread)):
        assert f".{layer}." in f".{name}."
        assert spread[layer] == torch.unique(slots).numel() / 64 ** 2  # 64 tokens x 32 slots over 4096 rows


def test_rows_read_is_empty_for_a_dense_model(tmp_path):
    from scripts.bench_train import rows_read

    assert rows_read(_setup(["model.memory.layers=[]"], tmp_path)) == {}
