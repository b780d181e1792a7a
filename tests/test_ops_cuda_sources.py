"""The compiled kernels' device code (ops/cuda_search.py's and ops/cuda_sort.py's KERNELS) compiles, wherever the
CUDA compiler is installed, GPU or not: a syntax or type error in a kernel shows here, not first on a GPU machine at
the build at first use. Every kernel the host code launches is instantiated in that source, so ptxas compiles each one
for the H100/H200 target."""
import os
import re
import shutil
import subprocess

import pytest

from ops import cuda_search, cuda_sort


def _nvcc():
    path = shutil.which("nvcc")
    if path is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        path = "/usr/local/cuda/bin/nvcc"
    return path


def _compile(source: str, tmp_path):
    src = tmp_path / "kernels.cu"
    src.write_text(source)
    return subprocess.run([_nvcc(), "-c", "-O3", "-std=c++17", "-arch=sm_90", "-Xptxas", "-v", str(src),
                           "-o", str(tmp_path / "kernels.o")], capture_output=True, text=True, timeout=600)


needs_nvcc = pytest.mark.skipif(_nvcc() is None, reason="needs the CUDA compiler (nvcc)")


@needs_nvcc
def test_search_kernels_compile_for_sm90(tmp_path):
    out = _compile(cuda_search.KERNELS, tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    compiled = re.findall(r"Compiling entry function '(\w+)'", out.stderr)
    assert sum("pk_select_kernel" in name for name in compiled) == 7  # one per keys-per-lane count, 1 .. 64
    assert sum("dense_rows_kernel" in name for name in compiled) == 2  # bf16, fp16
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill", out.stderr)]
    assert spills and not any(spills)  # a spill to local memory would cost speed


@needs_nvcc
def test_a_kernel_error_is_reported(tmp_path):
    broken = cuda_search.KERNELS.replace("__syncwarp();", "__syncwarp(", 1)
    out = _compile(broken, tmp_path)
    assert out.returncode != 0 and "error" in out.stderr


@needs_nvcc
def test_pair_sort_compiles_for_sm90(tmp_path):
    out = _compile(cuda_sort.KERNELS, tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    compiled = re.findall(r"Compiling entry function '(\w+)'", out.stderr)
    assert sum("pair_inputs_kernel" in name for name in compiled) == 2  # int64 and int32 rows
    assert any("DeviceRadixSort" in name for name in compiled)  # CUB's passes (one key/id type serves both)
