"""Config loading: presets parse, overrides apply, bad keys and values fail before compute, naming the key."""
import glob
import os

import pytest

from train.config import ConfigError, load_config, parse_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.model.n_layers >= 1


def test_overrides_apply():
    cfg = parse_cli([f"config={ROOT}/configs/tiny.yaml", "train.steps=7", "model.memory.layers=[0]"])
    assert cfg.train.steps == 7 and cfg.model.memory.layers == [0]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("nonsense=1", "nonsense"),
        ("train.steps=many", "train.steps"),
        ("model.memory.layers=[99]", "model.memory.layers"),
        ("model.memory.k_dim=33", "model.memory.k_dim"),
        ("model.memory.knn=100000", "model.memory.knn"),
        ("model.n_heads=5", "model.n_heads"),
        ("optim.lr=-1", "optim.lr"),
        ("train.precision=fp8", "train.precision"),
        ("logging.wandb=maybe", "logging.wandb"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("dist.reduce_dtype=fp8", "dist.reduce_dtype"),
        ("dist.blocks_per_unit=0", "dist.blocks_per_unit"),
        ("train.gc_every=-1", "train.gc_every"),
    ],
)
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        parse_cli([f"config={ROOT}/configs/tiny.yaml", override])
    assert str(err.value).startswith(key), str(err.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_cli_exits_2_before_compute(tmp_path, capsys):
    from train.__main__ import main

    assert main([f"config={ROOT}/configs/tiny.yaml", f"run_dir={tmp_path}/r", "model.memory.layers=[42]"]) == 2
    assert "model.memory.layers" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was created: rejected before any work


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.device=tpu", "train.device: Invalid value 'tpu', expected one of ['auto', 'cpu', 'cuda']"),
        ("model.memory.backend=cuda", "model.memory.backend: Invalid value 'cuda', expected one of"),
        # an item of a list of sections is named by its index, not by its bare key
        ("data.train=[{paths: [x.jsonl], type: csvx}]", "data.train[0].type: Invalid value 'csvx', expected one of"),
        ("data.val=[{paths: [x.jsonl]}, {paths: [y.jsonl], weight: abc}]", "data.val[1].weight: Value 'abc'"),
    ],
)
def test_choices_are_checked_by_their_type_naming_key_and_choices(override, message):
    with pytest.raises(ConfigError) as err:
        parse_cli([f"config={ROOT}/configs/tiny.yaml", override])
    assert str(err.value).startswith(message), str(err.value)


def test_choices_are_checked_in_configs_built_in_code():
    from train.config import DistConfig, LoopConfig

    with pytest.raises(ValueError, match=r"^train\.precision: must be one of auto, bf16, fp32, got 'fp8'$"):
        LoopConfig(precision="fp8").validate("train")
    with pytest.raises(ValueError, match=r"^dist\.backend: must be one of auto, nccl, gloo, got 'mpi'$"):
        DistConfig(backend="mpi").validate("dist")


def test_saved_config_yaml_loads_back_with_its_choices_as_strings(tmp_path):
    from train.config import to_yaml

    cfg = parse_cli([f"config={ROOT}/configs/tiny.yaml", "train.precision=bf16", "dist.reduce_dtype=param",
                     "model.memory.backend=reference"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert type(again.train.precision) is str and again.dist.reduce_dtype == "param"


def test_choices_of_a_field_type():
    from typing import List, Literal, Optional

    from model.cli_config import choices_of

    assert choices_of(Literal["a", "b"]) == ("a", "b")
    assert choices_of(Optional[Literal["a", "b"]]) == ("a", "b", None)
    assert choices_of(str) == () and choices_of(Optional[int]) == () and choices_of(List[str]) == ()
