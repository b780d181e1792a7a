"""Test-wide environment, set before any project module is imported.

Two kinds of session, chosen by `--device`:
- cpu (the default): the suite CI runs. Any GPU is hidden from this process and the ranks and subprocesses it
  starts (CUDA_VISIBLE_DEVICES=""), so every test sees what CI sees: the trainer's "auto" device is the CPU, Triton
  kernels run under TRITON_INTERPRET, the data loader starts no workers. Tests marked `gpu` are skipped.
- cuda (`--device cuda`; also `-m gpu` on a machine with a GPU): the tests marked `gpu`, and those marked
  `any_device` (they put their tensors on the GPU when there is one), on the GPU. The other tests are skipped: they
  are written for the CPU session (CPU tensors fed to a model the trainer would place on the GPU, CPU thresholds,
  ranks sharing one device).
`make test` runs the cpu session, then the cuda one where a GPU is present.

TRITON_INTERPRET must be set before triton kernels are imported, so it lives here rather than in the tests.
"""
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not initialise CUDA: hiding the GPU below still works)

# Two cores on CI: more threads than cores only adds contention, and spawned ranks set their own.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default=None,
                     help="cpu: the CPU suite with any GPU hidden (default); cuda: the gpu and any_device tests on the "
                          "GPU (default for -m gpu on a machine with a GPU)")


def _session_device(config) -> str:
    chosen = config.getoption("--device")
    if chosen is not None:
        return chosen
    # `-m gpu` alone: the GPU session where there is a GPU (asking torch is safe: without a GPU nothing is hidden)
    gpu_only = (config.getoption("markexpr") or "").strip() == "gpu"
    return "cuda" if gpu_only and torch.cuda.is_available() else "cpu"


def _interpreter_failure():
    """Why the Triton interpreter cannot run a loop over a kernel argument here, or None when it can. (The GPU image's
    Triton 3.6, torch 2.11's pin, fails on it there with NumPy 2.5's TypeError; CI's Triton runs it.)"""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        return f"triton does not import: {e}"

    @triton.jit
    def _count(out_ptr, n):
        total = 0
        for _ in range(0, n):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 - whatever the interpreter raises is the reason
        return f"{type(e).__name__}: {e}"
    return None if int(out) == 3 else f"a loop of 3 counted {int(out)}"


def _machine_has_gpu(visible_devices) -> bool:
    """Asked in a child process, with CUDA_VISIBLE_DEVICES as it was before the GPU was hidden (`visible_devices`):
    asking torch here would fix this process's device list."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices
    code = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def pytest_configure(config):
    config.mnemo_device = _session_device(config)
    if config.mnemo_device == "cpu":
        config.mnemo_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch for a device
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA device is available")


def pytest_collection_modifyitems(config, items):
    if config.mnemo_device == "cpu":
        skip = pytest.mark.skip(reason="needs a CUDA device: `pytest --device cuda` (or -m gpu) on a GPU machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
        # The any_device tests run their Triton kernels under the interpreter here. Where it is broken, they are
        # skipped only on a machine with a GPU, whose GPU session runs them all; elsewhere (CI) they fail loudly.
        interpreted = [item for item in items if "any_device" in item.keywords]
        why = _interpreter_failure() if interpreted else None
        if why is not None and _machine_has_gpu(config.mnemo_visible_devices):
            skip = pytest.mark.skip(reason=f"the Triton interpreter fails here ({why}); `pytest --device cuda` runs "
                                           "this test on the GPU")
            for item in interpreted:
                item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="a CPU-session test: plain `pytest` runs it, with the GPU hidden")
    for item in items:
        if "gpu" not in item.keywords and "any_device" not in item.keywords:
            item.add_marker(skip)
