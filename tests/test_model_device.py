"""One device and precision policy for training and evaluation (model/device.py)."""
import os

import pytest
import torch

from model.cli_config import ConfigError
from model.device import autocast, pick_device, pick_dtype

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_precision_is_bf16_on_a_gpu_and_fp32_elsewhere():
    assert pick_dtype("auto", GPU) == torch.bfloat16
    assert pick_dtype("auto", CPU) is None and pick_dtype(None, CPU) is None
    assert pick_dtype("bf16", CPU) == torch.bfloat16 and pick_dtype("fp32", GPU) is None
    assert pick_dtype(torch.float16, CPU) == torch.float16 and pick_dtype(torch.float32, GPU) is None
    with pytest.raises(ValueError, match="MnemoLM: dtype: must be auto or one of"):
        pick_dtype("int8", CPU, key="MnemoLM: dtype")


def test_autocast_only_below_fp32():
    x = torch.ones(2, 2)
    with autocast(CPU, torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(CPU, None):
        assert (x @ x).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_gpu_is_a_config_error_naming_the_key(capsys):
    assert pick_device("auto") == CPU and pick_device("cpu") == CPU
    with pytest.raises(ConfigError, match="^train.device: cuda requested but no CUDA device"):
        pick_device("cuda", key="train.device")
    from eval.__main__ import main

    assert main(["checkpoint=x", "val_batches=1", "device=cuda"]) == 2  # before the checkpoint is looked for
    assert capsys.readouterr().err.strip() == "config error: device: cuda requested but no CUDA device is available"


@pytest.mark.any_device
def test_the_cpu_session_hides_the_gpu(request):
    # tests/conftest.py: the default session is CI's, on every machine; a GPU left visible would put the trainer's
    # "auto" device, the data workers and the kernels' backend on it
    if request.config.mnemo_device == "cpu":
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    else:
        assert torch.cuda.is_available()
