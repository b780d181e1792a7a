"""Memory+ beside the FFN (model.memory.keep_ffn): the block adds both to the residual from the same normed input,
both train, the FLOP counter charges both, the weights round-trip through a checkpoint, and a checkpoint of the
other layout is refused."""
import os

import pytest
import torch
from torch import nn

from _train_helpers import RUN_SMALL
from model import MemoryConfig, ModelConfig, Transformer
from model.checkpoint import load_model
from model.flops import flops_per_token
from train.config import ConfigError, load_config
from train.loop import run
from train.trainable import apply_trainable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(keep_ffn, **memory):
    m = dict(layers=[1], n_keys=8, heads=2, knn=4, k_dim=8, keep_ffn=keep_ffn)
    m.update(memory)
    return ModelConfig(vocab_size=37, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16, ffn_dim=64,
                       memory=MemoryConfig(**m))


def _build(keep_ffn, seed=0):
    torch.manual_seed(seed)
    return Transformer(_cfg(keep_ffn)).eval()


def test_memory_block_holds_both_and_other_blocks_are_unchanged():
    beside, replace = _build(True), _build(False)
    names = set(dict(beside.named_parameters()))
    assert {f"layers.1.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")} <= names
    assert any(n.startswith("layers.1.memory.") for n in names)
    # the beside model is the replace model plus exactly one SwiGLU
    extra = names - set(dict(replace.named_parameters()))
    assert extra == {f"layers.1.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    assert beside.num_parameters() - replace.num_parameters() == 3 * 32 * 64
    assert beside.layers[1].is_memory and beside.layers[1].has_ffn
    assert not replace.layers[1].has_ffn and not beside.layers[0].is_memory


def test_block_output_is_residual_plus_ffn_plus_memory():
    model = _build(True)
    block = model.layers[1]
    x = torch.randn(2, 5, 32)
    cos, sin = model.rope(torch.arange(5).expand(2, 5))
    with torch.no_grad():
        h = x + block.attention(block.attention_norm(x), cos, sin, None, None, 1, 0)
        normed = block.ffn_norm(h)
        expected = h + block.feed_forward(normed) + block.memory(normed, model.values.weight)
        torch.testing.assert_close(block(x, cos, sin, pool=model.values), expected)
        # with the FFN's output projection zeroed, the block is the replacing layout with the same weights
        replace = _build(False)
        replace.load_state_dict(model.state_dict(), strict=False)
        block.feed_forward.w2.weight.zero_()
        tokens = torch.randint(0, 37, (2, 6))
        torch.testing.assert_close(model(tokens), replace(tokens))


def test_forward_backward_reaches_ffn_and_memory():
    model = _build(True).train()
    tokens = torch.randint(0, 37, (2, 8))
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    block = model.layers[1]
    for p in list(block.feed_forward.parameters()) + [block.memory.value_proj.weight, model.values.weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # `ffn` finetuning selects the SwiGLU beside the memory too
    names = apply_trainable(model, "ffn")
    assert {f"layers.{i}.feed_forward.w1.weight" for i in range(3)} <= set(names)


def _linear_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def test_flops_by_hand_beside_the_ffn():
    cfg = _cfg(True)
    count, replace = flops_per_token(cfg, 16), flops_per_token(_cfg(False), 16)
    assert count.ffn == 3 * 3 * (2 * 3 * 32 * 64)  # all three blocks keep their SwiGLU (3 matrices 32 x 64)
    assert replace.ffn == 3 * 2 * (2 * 3 * 32 * 64)
    assert count.memory == replace.memory  # the same memory layer
    assert count.total - replace.total == 3 * 2 * 3 * 32 * 64
    # against the built model: 6 x its linear weights + attention scores + the memory's search and lookup
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = 6 * _linear_weights(model) + 12 * cfg.n_layers * cfg.dim * 16
    assert count.total == expected + count.memory_search + count.memory_lookup


def test_keep_ffn_without_memory_layers_is_refused():
    with pytest.raises(ValueError, match=r"^model\.memory\.keep_ffn:"):
        ModelConfig(memory=MemoryConfig(keep_ffn=True)).validate("model")
    with pytest.raises(ConfigError, match=r"model\.memory\.keep_ffn"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["model.memory.layers=[]", "model.memory.keep_ffn=true"])
    ModelConfig(n_layers=4, memory=MemoryConfig(every=2, keep_ffn=True)).validate("model")


def _config(run_dir, *extra):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), RUN_SMALL + [f"run_dir={run_dir}"] + list(extra))


def test_checkpoint_round_trip_and_other_layout_refused(tmp_path):
    src = tmp_path / "beside"
    run(_config(src, "model.memory.layers=[1]", "model.memory.keep_ffn=true", "train.steps=2", "checkpoint.every=0",
                "checkpoint.save_final=true"))
    model, cfg = load_model(str(src))
    assert cfg.memory.keep_ffn and model.layers[1].has_ffn and model.layers[1].is_memory
    assert "layers.1.feed_forward.w1.weight" in model.state_dict()
    # starting the replacing layout from these weights names the key that differs
    with pytest.raises(ConfigError, match=r"model\.memory\.keep_ffn \(True -> False\)"):
        run(_config(tmp_path / "replace", "model.memory.layers=[1]", "train.steps=1", f"checkpoint.init_from={src}"))
