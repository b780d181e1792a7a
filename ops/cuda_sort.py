"""The lookup backward's pair sort (ops/triton_lookup.py's _sort_pairs) as a CUB radix sort over only the bits a row
index needs, with int32 pair ids.

The backward sorts every (token, slot) pair by its value row, stably, and keeps each sorted pair's flat position.
torch.sort sorts all 32 bits of the int32 keys and returns int64 positions. A table of 2^20 rows needs 20 bits, so
a radix sort over those bits alone makes fewer passes over the pairs, and int32 positions halve the ids' bytes in each
(BENCHMARKS.md, "the pairs' sort by CUB"). The result is torch.sort's, stable, with the positions as int32.

Built on first use (ops/cuda_build.py), like ops/cuda_search.py; where it cannot be built, the backward keeps
torch.sort (it warns once). Importing this module builds nothing.
"""
import functools

import torch

from . import cuda_build

# The device code alone (CUDA and CUB headers only, so that tests/test_ops_cuda_sources.py can compile it where nvcc
# exists), then the host function that runs it on torch tensors.
KERNELS = r"""
#include <cub/device/device_radix_sort.cuh>
#include <stdint.h>

namespace {
// The sort's inputs in one pass: each pair's row as an unsigned key, and its flat position.
template <typename I>
__global__ void pair_inputs_kernel(const I* __restrict__ rows, uint32_t* __restrict__ keys, int32_t* __restrict__ ids,
                                   int n) {
    // 64-bit positions: n may be close to 2^31, where the last step of an int stride would overflow
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        keys[i] = (uint32_t)rows[i];
        ids[i] = (int32_t)i;
    }
}
}  // namespace

// Stable sort of the n pairs (rows[i], i) by the low `bits` bits of the rows (every row < 2^bits). The buffers
// alternate between passes: keys[0]/ids[0] hold the inputs, and on return keys[*which]/ids[*which] the result.
// With temp == nullptr, only sets *temp_bytes.
template <typename I>
cudaError_t sort_pairs_by_row(const I* rows, uint32_t* keys[2], int32_t* ids[2], int n, int bits, void* temp,
                              size_t* temp_bytes, int* which, cudaStream_t stream) {
    cub::DoubleBuffer<uint32_t> k(keys[0], keys[1]);
    cub::DoubleBuffer<int32_t> v(ids[0], ids[1]);
    if (temp == nullptr) return cub::DeviceRadixSort::SortPairs(nullptr, *temp_bytes, k, v, n, 0, bits, stream);
    const int threads = 256;
    const int64_t wanted = ((int64_t)n + threads - 1) / threads;  // n + 255 may not fit an int
    const int blocks = (int)(wanted < 4096 ? wanted : 4096);
    pair_inputs_kernel<I><<<blocks, threads, 0, stream>>>(rows, keys[0], ids[0], n);
    const cudaError_t launched = cudaGetLastError();
    if (launched != cudaSuccess) return launched;
    const cudaError_t sorted = cub::DeviceRadixSort::SortPairs(temp, *temp_bytes, k, v, n, 0, bits, stream);
    *which = k.selector;
    return sorted;
}

// Every function the host code calls, instantiated here so that compiling this part alone checks them all.
template cudaError_t sort_pairs_by_row<int64_t>(const int64_t*, uint32_t* [2], int32_t* [2], int, int, void*,
                                                size_t*, int*, cudaStream_t);
template cudaError_t sort_pairs_by_row<int32_t>(const int32_t*, uint32_t* [2], int32_t* [2], int, int, void*,
                                                size_t*, int*, cudaStream_t);
"""

_HOST = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace {
template <typename I>
std::vector<at::Tensor> run(const at::Tensor& rows, int bits) {
    const int n = (int)rows.numel();
    auto opts = rows.options().dtype(at::kInt);
    at::Tensor key_buf[2] = {at::empty({n}, opts), at::empty({n}, opts)};
    at::Tensor id_buf[2] = {at::empty({n}, opts), at::empty({n}, opts)};
    uint32_t* keys[2] = {reinterpret_cast<uint32_t*>(key_buf[0].data_ptr<int32_t>()),
                         reinterpret_cast<uint32_t*>(key_buf[1].data_ptr<int32_t>())};
    int32_t* ids[2] = {id_buf[0].data_ptr<int32_t>(), id_buf[1].data_ptr<int32_t>()};
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    size_t temp_bytes = 0;
    int which = 0;
    const I* src = rows.data_ptr<I>();
    C10_CUDA_CHECK(sort_pairs_by_row<I>(src, keys, ids, n, bits, nullptr, &temp_bytes, &which, stream));
    at::Tensor temp = at::empty({(int64_t)(temp_bytes > 0 ? temp_bytes : 1)}, rows.options().dtype(at::kByte));
    C10_CUDA_CHECK(sort_pairs_by_row<I>(src, keys, ids, n, bits, temp.data_ptr(), &temp_bytes, &which, stream));
    return {key_buf[which], id_buf[which]};
}
}  // namespace

std::vector<at::Tensor> sort_pairs(at::Tensor rows, int64_t bits) {
    TORCH_CHECK(rows.is_cuda() && rows.dim() == 1 && rows.is_contiguous() &&
                (rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt),
                "sort_pairs: rows must be a contiguous 1-D CUDA int64/int32 tensor");
    TORCH_CHECK(rows.numel() >= 1 && rows.numel() < (int64_t)1 << 31, "sort_pairs: needs 1 <= pairs < 2^31");
    TORCH_CHECK(bits >= 1 && bits <= 31, "sort_pairs: bits must be in [1, 31]");
    const c10::cuda::CUDAGuard guard(rows.device());
    return rows.scalar_type() == at::kLong ? run<int64_t>(rows, (int)bits) : run<int32_t>(rows, (int)bits);
}
"""

_CPP = "std::vector<at::Tensor> sort_pairs(at::Tensor rows, int64_t bits);"


@functools.cache
def _extension():
    """The compiled sort (built by the first call on a machine, loaded from torch's extension cache after)."""
    return cuda_build.load("mnemo_pair_sort", _CPP, KERNELS + _HOST, ["sort_pairs"])


@functools.cache
def available() -> bool:
    """Whether the compiled sort builds and loads here; a failure warns once and leaves torch.sort in use."""
    return cuda_build.builds(_extension, "ops.cuda_sort: the CUB pair sort could not be built; the lookup backward "
                                         "sorts with torch.sort instead (slower)")


def applies(flat_rows: torch.Tensor, n_rows: int) -> bool:
    """Whether this sort serves these pairs: CUDA int64/int32 rows of a table of at most 2^31 rows, fewer than 2^31
    pairs. Checked before `available`, so that a CPU run never tries a build."""
    return (flat_rows.is_cuda and flat_rows.dtype in (torch.int64, torch.int32) and 1 <= flat_rows.numel() < 2**31
            and 1 <= n_rows <= 2**31)


def sort_pairs(flat_rows: torch.Tensor, n_rows: int):
    """(sorted_rows int32, positions int32): torch.sort(flat_rows, stable=True) for rows in [0, n_rows), sorted on
    the bits that n_rows - 1 needs only (a row outside that range would be sorted by its low bits)."""
    bits = max(1, (n_rows - 1).bit_length())
    return tuple(_extension().sort_pairs(flat_rows.contiguous(), bits))
