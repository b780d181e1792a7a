"""Config validation names the dotted key at fault."""
import dataclasses

import pytest

from model import MemoryConfig, ModelConfig


def _cfg(memory=None, **kw):
    base = dict(vocab_size=50, dim=32, n_layers=4, n_heads=4, n_kv_heads=2)
    base.update(kw)
    return ModelConfig(memory=MemoryConfig(**(memory or {})), **base)


def test_defaults_validate():
    ModelConfig().validate("model")
    _cfg(memory=dict(layers=[1, 3], n_keys=8, knn=8, k_dim=8)).validate("model")
    _cfg(memory=dict(layers=[1], n_keys=8, knn=8, k_dim=8, keep_ffn=True)).validate("model")


@pytest.mark.parametrize(
    "model_kw,memory_kw,key",
    [
        ({}, dict(layers=[4]), "model.memory.layers"),
        ({}, dict(layers=[-1]), "model.memory.layers"),
        ({}, dict(layers=[1, 1]), "model.memory.layers"),
        ({}, dict(k_dim=7), "model.memory.k_dim"),
        ({}, dict(n_keys=8, knn=9), "model.memory.knn"),
        ({}, dict(knn=0), "model.memory.knn"),
        ({}, dict(v_dim=0), "model.memory.v_dim"),
        ({}, dict(layers=[1], every=2), "model.memory.every"),
        ({}, dict(every=0), "model.memory.every"),
        ({}, dict(every=2, start=4), "model.memory.start"),
        ({}, dict(backend="cuda"), "model.memory.backend"),
        ({}, dict(heads=0), "model.memory.heads"),
        ({}, dict(value_init_std=0.0), "model.memory.value_init_std"),
        ({}, dict(keep_ffn=True), "model.memory.keep_ffn"),
        (dict(dim=30), {}, "model.n_heads"),
        (dict(n_heads=4, n_kv_heads=3), {}, "model.n_kv_heads"),
        (dict(attention_backend="flash"), {}, "model.attention_backend"),
        (dict(vocab_size=0), {}, "model.vocab_size"),
        (dict(norm_eps=0.0), {}, "model.norm_eps"),
        (dict(ffn_dim=0), {}, "model.ffn_dim"),
    ],
)
def test_validation_names_key(model_kw, memory_kw, key):
    cfg = _cfg(memory=memory_kw, **model_kw)
    with pytest.raises(ValueError, match="^" + key.replace(".", r"\.") + ":"):
        cfg.validate("model")


def test_resolved_layers():
    assert MemoryConfig(layers=[3, 1]).resolved_layers(4) == [1, 3]
    assert MemoryConfig(every=8, start=4).resolved_layers(24) == [4, 12, 20]
    assert MemoryConfig().resolved_layers(4) == []


def test_hidden_dim_rounding():
    assert _cfg(dim=96, multiple_of=64).hidden_dim == 256  # int(8*96/3) = 256
    assert _cfg(dim=100, multiple_of=64).hidden_dim == 320  # 266 -> 320
    assert _cfg(ffn_dim=77).hidden_dim == 77


def test_omegaconf_structured():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"memory": {"layers": [1]}}))
    assert isinstance(cfg.memory, MemoryConfig) and cfg.memory.layers == [1]
    assert dataclasses.asdict(cfg)["memory"]["layers"] == [1]
