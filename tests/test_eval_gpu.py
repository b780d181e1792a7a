"""CUDA + bf16 autocast path of the scorers (skipped without a GPU)."""
import pytest
import torch

from data import load_tokenizer
from eval import EvalConfig, generate_tokens, run_tasks, validation_nll
from eval.synthetic_facts import generate
from model import MemoryConfig, ModelConfig, Transformer


def tiny_model():
    cfg = ModelConfig(vocab_size=259, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256,
                      memory=MemoryConfig(layers=[1], n_keys=16, heads=2, knn=8, k_dim=32))
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.mark.gpu
def test_bf16_cuda_matches_fp32_cpu(tmp_path):
    generate(str(tmp_path), 8, 0)
    tok, cpu = load_tokenizer("byte"), tiny_model()
    gpu = tiny_model().cuda()
    cfg = EvalConfig(tasks=[f"synthetic:{tmp_path}"], max_examples=16, max_new_tokens=4)
    ref = run_tasks(cpu, tok, cfg)
    got = run_tasks(gpu, tok, cfg, amp_dtype=torch.bfloat16)
    for task in ref:
        assert got[task]["answer_nll"] == pytest.approx(ref[task]["answer_nll"], rel=0.03)
    batches = [torch.randint(0, 256, (2, 33)) for _ in range(2)]
    assert validation_nll(gpu, batches, tok, torch.bfloat16)["loss"] == pytest.approx(validation_nll(cpu, batches, tok)["loss"], rel=0.02)
    prompts = [[257, 5, 6, 7, 8], [257, 3]]
    out = generate_tokens(gpu, prompts, 8, amp_dtype=torch.bfloat16)
    assert [len(o) for o in out] == [8, 8]
    out32 = generate_tokens(gpu, prompts, 8)
    assert out32 == [generate_tokens(gpu, [p], 8)[0] for p in prompts]  # left padding on GPU, fp32
