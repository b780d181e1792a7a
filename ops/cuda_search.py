"""Product-key search with a compiled CUDA top-k: cuBLAS scores, then one warp per (token, head) selects exactly.

The contract and the backward are ops/triton_search.py's for bf16/fp16 queries: scores are the dots in the query's
dtype with fp32 accumulation (here cuBLAS batched GEMMs with an fp32 output), and the top-knn are exact for those
scores, ordered by score, then lower index, in both halves and among the candidate slots. cuBLAS may sum the dots in
another order than the Triton kernel's tensor-core dots, so the two can round a score differently in its last bit and
then pick differently between slots whose scores are that close. Why a second implementation: most of the
Triton search's time is its bitonic top-k moving data through shared memory (BENCHMARKS.md), and Triton cannot keep
a row in one warp's registers. Here a warp holds a row of sub-key scores (32 per lane for 1024 keys) and finds its
32nd largest by bisecting, over the scores' order-preserving bits, the interval from the smallest lane maximum to the
largest score (a warp-wide count per step, stopping as soon as exactly 32 keys lie at or above the midpoint), then
gathers the 32 (each lane its own, marked in a mask, after the lanes before it; by ballots in element order when
keys tie at the cut) and sorts them with shuffles.
The same select takes the top 32 of the candidate sums s1[a] + s2[b] with (a+1)(b+1) <= knn. The backward is the
Triton search's (dense gradient rows over the sub-keys, then GEMMs), with those rows written by a kernel here: one
warp builds a token's two rows in shared memory and stores them whole, so no buffer is zeroed first.

Built on first use (ops/cuda_build.py: needs nvcc and ninja; kept in torch's extension cache, so later processes
only load it). ops.product_key_search's "auto" backend takes this path for CUDA bf16/fp16 queries with knn <= 32
and n_keys <= 2048; when the build fails it warns once and runs the Triton kernel (the same search up to the rounding
above). Importing this module builds nothing.
"""
import functools

import torch

from . import cuda_build
from .triton_search import _bmm_f32, check_search_args, empty_results, register_search_autograd, search_backward
from .triton_search import search_backward_fake, search_forward_fake
from .triton_search import search_forward as triton_forward

MAX_KNN = 32  # one result per lane
MAX_KEYS = 2048  # 64 keys per lane in registers
_SCORES_BUDGET = 1 << 29  # bytes of the two fp32 score buffers per chunk of tokens

# The device code alone (CUDA headers only, so that tests/test_ops_cuda_sources.py can compile it where nvcc exists,
# without torch's CUDA headers), then the host functions that launch it from torch tensors.
KERNELS = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {
constexpr unsigned FULL = 0xffffffffu;

// Unsigned order of the result == float order (-0 below +0, NaN above +inf), as the Triton kernel's packing.
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t b = __float_as_uint(f);
    return b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u);  // negative: all bits flipped; else the sign bit set
}
__device__ __forceinline__ float from_key(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// A selected element as one descending-sortable word: high half the score key, low half ~index (lower index wins
// a tie). Candidate keys arrive already in this form.
__device__ __forceinline__ uint64_t staged(uint32_t key, uint32_t position) {
    return ((uint64_t)key << 32) | (uint32_t)~position;
}
__device__ __forceinline__ uint64_t staged(uint64_t key, uint32_t) { return key; }

// Bitonic sort of one word per lane, descending across the warp.
__device__ __forceinline__ uint64_t warp_sort_desc(uint64_t v, int lane) {
#pragma unroll
    for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            const uint64_t other = __shfl_xor_sync(FULL, v, stride);
            const bool descending = (lane & size) == 0;
            const bool lower = (lane & stride) == 0;
            // the lane keeps the larger word where lower == descending, else the smaller: one compare (equal words
            // are the same either way)
            v = ((v > other) == (lower == descending)) ? v : other;
        }
    }
    return v;
}

__device__ __forceinline__ uint32_t warp_min(uint32_t v) { return __reduce_min_sync(FULL, v); }
__device__ __forceinline__ uint32_t warp_max(uint32_t v) { return __reduce_max_sync(FULL, v); }
__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) { const uint64_t w = __shfl_xor_sync(FULL, v, o); v = w > v ? w : v; }
    return v;
}
// Sum of v over lanes 0 .. lane.
__device__ __forceinline__ int warp_inclusive_sum(int v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(FULL, v, o);
        if (lane >= o) v += y;
    }
    return v;
}

// How many of a lane's keys are >= cand (cand >= 1), summed in four independent parts: one running sum chains every
// key's add after the last one's, a serial dependency per key in every step of the select. 32-bit keys count by
// a carry: k + (2^32 - cand) carries out exactly when k >= cand, and the add-with-carry takes it (two instructions
// per key, where a compare, an add and a select took three).
__device__ __forceinline__ void add_if_at_least(int& c, uint32_t k, uint32_t neg_cand) {
    asm("{\n\t.reg .u32 t;\n\tadd.cc.u32 t, %1, %2;\n\taddc.u32 %0, %0, 0;\n\t}" : "+r"(c) : "r"(k), "r"(neg_cand));
}
__device__ __forceinline__ void add_if_at_least(int& c, uint64_t k, uint64_t cand) { c += k >= cand; }
__device__ __forceinline__ uint32_t carry_operand(uint32_t cand) { return 0u - cand; }
__device__ __forceinline__ uint64_t carry_operand(uint64_t cand) { return cand; }
template <typename K, int PER>
__device__ __forceinline__ int count_at_least(const K (&k)[PER], K cand) {
    const K operand = carry_operand(cand);
    int part[4] = {0, 0, 0, 0};
#pragma unroll
    for (int j = 0; j < PER; ++j) add_if_at_least(part[j % 4], k[j], operand);
    return (part[0] + part[1]) + (part[2] + part[3]);
}

// Bounds of the bisection from the lanes' maxima: their smallest and largest. A candidate's 64-bit word takes the
// bounds of its high word (the score's key), one warp reduction each: a bisection needs them no tighter.
__device__ __forceinline__ void key_bounds(uint32_t lane_max, uint32_t& lo, uint32_t& hi) {
    lo = warp_min(lane_max);
    hi = warp_max(lane_max);
}
__device__ __forceinline__ void key_bounds(uint64_t lane_max, uint64_t& lo, uint64_t& hi) {
    const uint32_t high = (uint32_t)(lane_max >> 32);
    lo = (uint64_t)warp_min(high) << 32;
    hi = ((uint64_t)warp_max(high) << 32) | 0xffffffffull;
}

// The largest of the warp's keys below `below` (0 if none).
template <typename K, int PER>
__device__ __forceinline__ K largest_below(const K (&k)[PER], K below) {
    K m = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) m = (k[j] < below && k[j] > m) ? k[j] : m;
    return warp_max(m);
}

// The 32nd largest of the warp's PER * 32 keys (element j * 32 + lane in k[j] of that lane), or a key with exactly
// 32 keys at or above it. It lies between the smallest lane maximum (each lane holds a key >= it: 32 keys) and the
// largest key, and a bisection of that interval needs fewer counts than a walk down the bits from the first bit in
// which the two differ (which spans the whole exponent range between them). Invariant: >= 32 keys >= lo, < 32 > hi.
// A bisection never tries a key below lo, so when the 32nd largest is lo itself (the 32 largest in 32 lanes: a
// dominant first sub-key puts its 32 candidate pairs there) it would close in on lo bit by bit; but as soon as 31
// keys lie at or above mid, the 32nd is the largest key below mid. Only the candidates' (64-bit) select takes that
// pass: in a row of sub-key scores the 32 largest lie in 32 lanes with a probability of about 32!/32^32, and the
// test in every step costs the rows more than it saves.
template <typename K, int PER>
__device__ __forceinline__ K cut_key(const K (&k)[PER]) {
    K lane_max = k[0];
#pragma unroll
    for (int j = 1; j < PER; ++j) lane_max = k[j] > lane_max ? k[j] : lane_max;
    K lo, hi;
    key_bounds(lane_max, lo, hi);
    while (lo < hi) {
        const K mid = hi - ((hi - lo) >> 1);  // in (lo, hi], so >= 1 as count_at_least needs
        const int count = __reduce_add_sync(FULL, count_at_least<K, PER>(k, mid));
        if (count >= 32) {
            lo = mid;
            if (count == 32) break;  // exactly 32 keys >= mid: they are the set
        } else if (sizeof(K) == 8 && count == 31) {
            return largest_below<K, PER>(k, mid);
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// Stages the keys >= thr when there are exactly 32: every lane writes its own after the lanes before it.
template <typename K, int PER>
__device__ __forceinline__ void stage_at_least(const K (&k)[PER], K thr, int mine, int lane, uint64_t* stage) {
    int at = warp_inclusive_sum(mine, lane) - mine;
#pragma unroll
    for (int j = 0; j < PER; ++j)
        if (k[j] >= thr) stage[at++] = staged(k[j], j * 32 + lane);
}

// Stages the 32 largest when more than 32 keys are >= thr (a tie at the cut): all keys > thr, then the keys == thr
// in element order until 32.
template <typename K, int PER>
__device__ __forceinline__ void stage_with_ties(const K (&k)[PER], K thr, int lane, uint64_t* stage) {
    const uint32_t before = (1u << lane) - 1u;
    int above = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) above += k[j] > thr;
    const int room = 32 - __reduce_add_sync(FULL, above);
    int taken = 0, equal_seen = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const bool equal = k[j] == thr;
        const uint32_t equal_mask = __ballot_sync(FULL, equal);
        const bool take = k[j] > thr || (equal && equal_seen + __popc(equal_mask & before) < room);
        const uint32_t take_mask = __ballot_sync(FULL, take);
        if (take) stage[taken + __popc(take_mask & before)] = staged(k[j], j * 32 + lane);
        taken += __popc(take_mask);
        equal_seen += __popc(equal_mask);
    }
}

// Lane l gets the l-th largest of the 32 staged words.
__device__ __forceinline__ uint64_t sorted_stage(const uint64_t* stage, int lane) {
    __syncwarp();
    const uint64_t mine = stage[lane];
    __syncwarp();  // the stage is free for the next select
    return warp_sort_desc(mine, lane);
}

// Stages the 32 largest of the warp's keys given their cut key thr (cut_key), equal keys at the cut taken in element
// order. `stage` is 32 words of this warp's shared memory.
template <typename K, int PER>
__device__ __forceinline__ void stage_top32(const K (&k)[PER], K thr, int lane, uint64_t* stage) {
    int mine = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) mine += k[j] >= thr;
    if (__reduce_add_sync(FULL, mine) == 32) stage_at_least<K, PER>(k, thr, mine, lane, stage);
    else stage_with_ties<K, PER>(k, thr, lane, stage);
}

// The 32 largest of the warp's PER * 32 keys (element j * 32 + lane in k[j] of that lane); lane l returns the l-th
// largest, staged.
template <typename K, int PER>
__device__ __forceinline__ uint64_t top32(const K (&k)[PER], int lane, uint64_t* stage) {
    stage_top32<K, PER>(k, cut_key<K, PER>(k), lane, stage);
    return sorted_stage(stage, lane);
}

// Bit PER - 1 - j of the result says whether k[j] >= cand (cand >= 1): the add-with-carry doubles the mask and adds
// the carry, two instructions per key.
template <int PER>
__device__ __forceinline__ uint32_t mask_at_least(const uint32_t (&k)[PER], uint32_t cand) {
    const uint32_t neg_cand = 0u - cand;
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j)
        asm("{\n\t.reg .u32 t;\n\tadd.cc.u32 t, %1, %2;\n\taddc.u32 %0, %0, %0;\n\t}"
            : "+r"(m) : "r"(k[j]), "r"(neg_cand));
    return m;
}

// top32 for a row of sub-key scores (k loaded from `row` by load_keys). About one key per lane is chosen, so without
// a tie at the cut each lane marks its chosen keys in a mask and stages only those, reading each again from `row`
// (just loaded, so from L1): a register array cannot be indexed by a loop over set bits.
template <int PER>
__device__ __forceinline__ uint64_t top32_row(const uint32_t (&k)[PER], const float* row, int lane, uint64_t* stage) {
    const uint32_t thr = cut_key<uint32_t, PER>(k);
    if (PER > 32 || thr == 0u) {  // a mask of more than 32 keys, or padding keys (0) in the count: the general path
        stage_top32<uint32_t, PER>(k, thr, lane, stage);
        return sorted_stage(stage, lane);
    }
    uint32_t m = mask_at_least<PER>(k, thr);
    const int mine = __popc(m);
    if (__reduce_add_sync(FULL, mine) != 32) {
        stage_with_ties<uint32_t, PER>(k, thr, lane, stage);
    } else {
        int at = warp_inclusive_sum(mine, lane) - mine;
        while (m) {
            const int bit = 31 - __clz(m);
            m ^= 1u << bit;
            const int e = (PER - 1 - bit) * 32 + lane;
            stage[at++] = staged(order_key(row[e]), e);
        }
    }
    return sorted_stage(stage, lane);
}

// Candidate c of the rank pairs (a, b) with (a+1)(b+1) <= knn, a-major: rank a has knn / (a+1) pairs, starting at
// `first` of lane a (an exclusive prefix sum over lanes). The largest a with first[a] <= c is found by a binary
// search over lanes with shuffles (every lane searches for its own c). False past the last pair.
__device__ __forceinline__ bool candidate_pair(int c, int knn, int first, int total, int& a, int& b) {
    int lo = 0;
#pragma unroll
    for (int step = 16; step > 0; step >>= 1) {
        const int probe = lo + step;
        const int f = __shfl_sync(FULL, first, probe & 31);
        if (probe < knn && f <= c) lo = probe;
    }
    a = lo;
    b = c - __shfl_sync(FULL, first, lo);
    return c < total;
}

// A row of NK scores as order keys, element j * 32 + lane in k[j]; 0 (below every score) past the row's end.
template <int PER>
__device__ __forceinline__ void load_keys(const float* row, int NK, int lane, uint32_t (&k)[PER]) {
    if (NK == PER * 32) {  // a whole row (1024 sub-keys: 32 per lane): no bound to test per key
#pragma unroll
        for (int j = 0; j < PER; ++j) k[j] = order_key(row[j * 32 + lane]);
    } else {
#pragma unroll
        for (int j = 0; j < PER; ++j) k[j] = j * 32 + lane < NK ? order_key(row[j * 32 + lane]) : 0u;
    }
}

// s1, s2: [H, T, NK] fp32 scores of the two halves; one warp per row t * H + h; out: [T, H, knn].
template <int PER>
__global__ void pk_select_kernel(const float* __restrict__ s1, const float* __restrict__ s2,
                                 float* __restrict__ out_scores, int64_t* __restrict__ out_slots,
                                 int T, int H, int NK, int knn) {
    extern __shared__ uint64_t stages[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + warp;
    if (row >= (int64_t)T * H) return;  // whole warps only
    const int64_t t = row / H, h = row % H;
    uint64_t* stage = stages + warp * 32;
    uint32_t k[PER];
    const float* row1 = s1 + (h * T + t) * NK;
    load_keys(row1, NK, lane, k);
    const uint64_t best1 = top32_row<PER>(k, row1, lane, stage);
    const float* row2 = s2 + (h * T + t) * NK;
    load_keys(row2, NK, lane, k);
    const uint64_t best2 = top32_row<PER>(k, row2, lane, stage);
    // lane r holds rank r of each half; candidate c = (rank a of half 1, rank b of half 2)
    const float v1 = from_key((uint32_t)(best1 >> 32)), v2 = from_key((uint32_t)(best2 >> 32));
    const uint32_t i1 = ~(uint32_t)best1, i2 = ~(uint32_t)best2;
    const int pairs = lane < knn ? knn / (lane + 1) : 0;
    int first = warp_inclusive_sum(pairs, lane);
    const int total = __shfl_sync(FULL, first, 31);
    first -= pairs;
    uint64_t cand[4];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        int a, b;
        const bool valid = candidate_pair(m * 32 + lane, knn, first, total, a, b);
        if (!valid) a = b = 0;
        const float va = __shfl_sync(FULL, v1, a), vb = __shfl_sync(FULL, v2, b);
        const uint32_t ia = __shfl_sync(FULL, i1, a), ib = __shfl_sync(FULL, i2, b);
        cand[m] = valid ? staged(order_key(va + vb), ia * (uint32_t)NK + ib) : 0ull;
    }
    const uint64_t best = top32<uint64_t, 4>(cand, lane, stage);
    if (lane < knn) {
        out_scores[row * knn + lane] = from_key((uint32_t)(best >> 32));
        out_slots[row * knn + lane] = (int64_t)(~(uint32_t)best);
    }
}

__device__ __forceinline__ void store_value(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store_value(__half* p, float x) { *p = __float2half_rn(x); }

// One warp per (token of the chunk, head): rows w1[h, t - t0] and w2[h, t - t0] over the sub-keys get the token's
// score gradients on its chosen sub-keys of each half (a sub-key chosen by several slots: their sum, added in slot
// order), zeros elsewhere. The rows are built in shared memory and written whole, so the buffers need no zeroing.
// idx, g: [T, H, knn] (slot = i1 * NK + i2); w1, w2: [H, TC, NK].
template <typename T>
__global__ void dense_rows_kernel(const int64_t* __restrict__ idx, const float* __restrict__ g, T* __restrict__ w1,
                                  T* __restrict__ w2, int64_t t0, int64_t TC, int H, int NK, int knn) {
    extern __shared__ uint4 rows_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + warp;
    if (row >= TC * H) return;  // whole warps only
    const int64_t tc = row / H;
    const int h = (int)(row % H);
    T* r1 = reinterpret_cast<T*>(rows_smem) + (int64_t)warp * 2 * NK;
    T* r2 = r1 + NK;
    uint32_t* words = reinterpret_cast<uint32_t*>(r1);  // both rows: NK words of two elements
    for (int i = lane; i < NK; i += 32) words[i] = 0u;
    __syncwarp();
    const bool active = lane < knn;
    const int64_t base = ((t0 + tc) * H + h) * knn;
    const int64_t slot = active ? idx[base + lane] : 0;
    const float gl = active ? g[base + lane] : 0.f;
    const int i1 = active ? (int)(slot / NK) : -1, i2 = active ? (int)(slot % NK) : -1;
    const uint32_t m1 = __match_any_sync(FULL, i1), m2 = __match_any_sync(FULL, i2);
    float s1 = 0.f, s2 = 0.f;
    for (int k = 0; k < knn; ++k) {  // every lane sums the slots that share its sub-key, in slot order
        const float gk = __shfl_sync(FULL, gl, k);
        if ((m1 >> k) & 1u) s1 += gk;
        if ((m2 >> k) & 1u) s2 += gk;
    }
    if (active && __ffs(m1) - 1 == lane) store_value(r1 + i1, s1);  // the first slot of a sub-key stores it
    if (active && __ffs(m2) - 1 == lane) store_value(r2 + i2, s2);
    __syncwarp();
    T* o1 = w1 + ((int64_t)h * TC + tc) * NK;
    T* o2 = w2 + ((int64_t)h * TC + tc) * NK;
    if (NK % 8 == 0) {  // 16-byte stores
        const uint4* s1v = reinterpret_cast<const uint4*>(r1);
        const uint4* s2v = reinterpret_cast<const uint4*>(r2);
        for (int i = lane; i < NK / 8; i += 32) {
            reinterpret_cast<uint4*>(o1)[i] = s1v[i];
            reinterpret_cast<uint4*>(o2)[i] = s2v[i];
        }
    } else {
        for (int i = lane; i < NK; i += 32) { o1[i] = r1[i]; o2[i] = r2[i]; }
    }
}

// Every kernel the host code launches, instantiated here so that compiling this part alone checks them all.
#define MNEMO_SELECT(PER) template __global__ void pk_select_kernel<PER>(const float*, const float*, float*, int64_t*, \
                                                                     int, int, int, int);
MNEMO_SELECT(1) MNEMO_SELECT(2) MNEMO_SELECT(4) MNEMO_SELECT(8) MNEMO_SELECT(16) MNEMO_SELECT(32) MNEMO_SELECT(64)
#undef MNEMO_SELECT
template __global__ void dense_rows_kernel<__nv_bfloat16>(const int64_t*, const float*, __nv_bfloat16*,
                                                          __nv_bfloat16*, int64_t, int64_t, int, int, int);
template __global__ void dense_rows_kernel<__half>(const int64_t*, const float*, __half*, __half*, int64_t, int64_t,
                                                   int, int, int);
}  // namespace
"""

_HOST = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace {
template <int PER>
void launch(const at::Tensor& s1, const at::Tensor& s2, at::Tensor& scores, at::Tensor& slots, int knn) {
    const int H = s1.size(0), T = s1.size(1), NK = s1.size(2);
    constexpr int WARPS = 4;
    const int64_t rows = (int64_t)T * H;
    const dim3 grid((unsigned)((rows + WARPS - 1) / WARPS)), block(32 * WARPS);
    pk_select_kernel<PER><<<grid, block, WARPS * 32 * sizeof(uint64_t), at::cuda::getCurrentCUDAStream()>>>(
        s1.data_ptr<float>(), s2.data_ptr<float>(), scores.data_ptr<float>(), slots.data_ptr<int64_t>(), T, H, NK, knn);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace

void pk_select(at::Tensor s1, at::Tensor s2, at::Tensor scores, at::Tensor slots, int64_t knn) {
    TORCH_CHECK(s1.is_cuda() && s1.scalar_type() == at::kFloat && s1.dim() == 3 && s1.is_contiguous(),
                "pk_select: s1 must be a contiguous CUDA float32 [H, T, NK] tensor");
    TORCH_CHECK(s2.sizes() == s1.sizes() && s2.scalar_type() == at::kFloat && s2.is_contiguous(),
                "pk_select: s2 like s1");
    TORCH_CHECK(knn >= 1 && knn <= 32 && knn <= s1.size(2), "pk_select: knn must be in [1, min(32, NK)]");
    TORCH_CHECK(scores.is_contiguous() && slots.is_contiguous() && scores.numel() == s1.size(0) * s1.size(1) * knn &&
                slots.scalar_type() == at::kLong, "pk_select: outputs must be contiguous [T, H, knn] float32 / int64");
    const c10::cuda::CUDAGuard guard(s1.device());
    const int64_t nk = s1.size(2);
    const int per = nk <= 32 ? 1 : nk <= 64 ? 2 : nk <= 128 ? 4 : nk <= 256 ? 8 : nk <= 512 ? 16 : nk <= 1024 ? 32 : 64;
    TORCH_CHECK(nk <= 2048, "pk_select: at most 2048 sub-keys");
    switch (per) {
        case 1: launch<1>(s1, s2, scores, slots, (int)knn); break;
        case 2: launch<2>(s1, s2, scores, slots, (int)knn); break;
        case 4: launch<4>(s1, s2, scores, slots, (int)knn); break;
        case 8: launch<8>(s1, s2, scores, slots, (int)knn); break;
        case 16: launch<16>(s1, s2, scores, slots, (int)knn); break;
        case 32: launch<32>(s1, s2, scores, slots, (int)knn); break;
        default: launch<64>(s1, s2, scores, slots, (int)knn); break;
    }
}

void pk_dense_rows(at::Tensor idx, at::Tensor g, at::Tensor w1, at::Tensor w2, int64_t t0) {
    TORCH_CHECK(idx.is_cuda() && idx.scalar_type() == at::kLong && idx.dim() == 3 && idx.is_contiguous(),
                "pk_dense_rows: idx must be a contiguous CUDA int64 [T, H, knn] tensor");
    TORCH_CHECK(g.sizes() == idx.sizes() && g.scalar_type() == at::kFloat && g.is_contiguous(),
                "pk_dense_rows: g must be float32 like idx");
    TORCH_CHECK(w1.dim() == 3 && w1.sizes() == w2.sizes() && w1.scalar_type() == w2.scalar_type() &&
                (w1.scalar_type() == at::kBFloat16 || w1.scalar_type() == at::kHalf) && w1.is_contiguous() &&
                w2.is_contiguous() && w1.size(0) == idx.size(1),
                "pk_dense_rows: w1, w2 must be contiguous bf16/fp16 [H, TC, NK]");
    const int64_t H = w1.size(0), TC = w1.size(1), NK = w1.size(2), knn = idx.size(2);
    TORCH_CHECK(knn >= 1 && knn <= 32 && NK <= 2048 && t0 >= 0 && t0 + TC <= idx.size(0),
                "pk_dense_rows: needs knn <= 32, NK <= 2048 and tokens t0 .. t0 + TC of idx");
    if (TC == 0) return;
    const c10::cuda::CUDAGuard guard(w1.device());
    constexpr int WARPS = 4;
    const int64_t rows = TC * H;
    const dim3 grid((unsigned)((rows + WARPS - 1) / WARPS)), block(32 * WARPS);
    const size_t smem = (size_t)WARPS * 2 * NK * 2;  // two rows of 2-byte elements per warp (<= 32 KiB)
    auto stream = at::cuda::getCurrentCUDAStream();
    if (w1.scalar_type() == at::kBFloat16) {
        dense_rows_kernel<__nv_bfloat16><<<grid, block, smem, stream>>>(
            idx.data_ptr<int64_t>(), g.data_ptr<float>(), reinterpret_cast<__nv_bfloat16*>(w1.data_ptr()),
            reinterpret_cast<__nv_bfloat16*>(w2.data_ptr()), t0, TC, (int)H, (int)NK, (int)knn);
    } else {
        dense_rows_kernel<__half><<<grid, block, smem, stream>>>(
            idx.data_ptr<int64_t>(), g.data_ptr<float>(), reinterpret_cast<__half*>(w1.data_ptr()),
            reinterpret_cast<__half*>(w2.data_ptr()), t0, TC, (int)H, (int)NK, (int)knn);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""

_CPP = ("void pk_select(at::Tensor s1, at::Tensor s2, at::Tensor scores, at::Tensor slots, int64_t knn);\n"
        "void pk_dense_rows(at::Tensor idx, at::Tensor g, at::Tensor w1, at::Tensor w2, int64_t t0);")


@functools.cache
def _extension():
    """The compiled selection (built by the first call on a machine, loaded from torch's extension cache after)."""
    return cuda_build.load("mnemo_pk_select", _CPP, KERNELS + _HOST, ["pk_select", "pk_dense_rows"])


@functools.cache
def available() -> bool:
    """Whether the CUDA selection builds and loads here; a failure warns once and leaves the Triton kernel in use."""
    return cuda_build.builds(_extension, "ops.cuda_search: the CUDA top-k could not be built; the product-key search "
                                         "runs the Triton kernel instead (slower)")


def fits(on_cuda: bool, query_dtype: torch.dtype, knn: int, n_keys: int) -> bool:
    """Whether queries of this dtype on this device, with these knn and sub-keys per half, take this search."""
    return (on_cuda and query_dtype in (torch.bfloat16, torch.float16) and 1 <= knn <= MAX_KNN
            and knn <= n_keys <= MAX_KEYS)


def applies(query: torch.Tensor, keys1: torch.Tensor, knn: int) -> bool:
    """Whether this search serves these inputs (the rest go to the Triton kernel)."""
    return keys1.dim() == 3 and fits(query.is_cuda, query.dtype, knn, keys1.shape[1])


def search_forward(query, keys1, keys2, knn: int):
    """(scores [T, H, knn] fp32 desc, slots [T, H, knn] int64) for inputs that `applies` accepts."""
    T, H, _ = query.shape
    NK, half = keys1.shape[1], keys1.shape[2]
    scores, slots = empty_results(query, knn)
    if T == 0:
        return scores, slots
    k1 = keys1.to(query.dtype).transpose(1, 2)  # [H, half, NK]
    k2 = keys2.to(query.dtype).transpose(1, 2)
    ext = _extension()
    chunk = max(1, _SCORES_BUDGET // (2 * H * NK * 4))
    for t0 in range(0, T, chunk):
        q = query[t0:t0 + chunk]
        s1 = _bmm_f32(q[..., :half].transpose(0, 1), k1)  # [H, n, NK]
        s2 = _bmm_f32(q[..., half:].transpose(0, 1), k2)
        ext.pk_select(s1, s2, scores[t0:t0 + chunk], slots[t0:t0 + chunk], knn)
    return scores, slots


def dense_grad_rows(indices, grad_scores, t0: int, n: int, n_keys: int, dtype):
    """ops.triton_search.dense_grad_rows's contract for bf16/fp16 rows: each warp builds a token's two rows in shared
    memory and writes them whole (no zeroed buffers, no separate fill)."""
    w1 = torch.empty((indices.shape[1], n, n_keys), dtype=dtype, device=indices.device)
    w2 = torch.empty_like(w1)
    _extension().pk_dense_rows(indices, grad_scores, w1, w2, t0)
    return w1, w2


@torch.library.custom_op("mnemo::cuda_pk_search", mutates_args=())
def _search_op(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor,
               knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Decided here, at run time (not while torch.compile traces): a machine without a compiler runs the Triton kernel.
    if available():
        return search_forward(query, keys1, keys2, knn)
    return triton_forward(query, keys1, keys2, knn)


_search_op.register_fake(search_forward_fake)


@torch.library.custom_op("mnemo::cuda_pk_search_backward", mutates_args=())
def _search_bwd_op(grad_scores: torch.Tensor, indices: torch.Tensor, query: torch.Tensor, keys1: torch.Tensor,
                   keys2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the Triton search's backward; its dense gradient rows from the compiled kernel where it built
    rows = dense_grad_rows if applies(query, keys1, indices.shape[-1]) and available() else None
    return search_backward(grad_scores, indices, query, keys1, keys2, dense_rows=rows)


_search_bwd_op.register_fake(search_backward_fake)


register_search_autograd(_search_op, _search_bwd_op)


def product_key_search(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, knn: int):
    """ops.triton_search.product_key_search's contract, for inputs that `applies` accepts."""
    check_search_args(query, keys1, keys2, knn)
    if not applies(query, keys1, knn):
        raise ValueError(f"cuda_search: needs CUDA bf16/fp16 queries, knn <= {MAX_KNN} and n_keys <= {MAX_KEYS}; "
                         f"got {query.device} {query.dtype}, knn {knn}, n_keys {keys1.shape[1]}")
    return _search_op(query.contiguous(), keys1.contiguous(), keys2.contiguous(), int(knn))
