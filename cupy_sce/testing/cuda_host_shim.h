// cuda_host_shim.h -- run CUDA kernel source on the CPU, for tests.
//
// Include this before the .cu file and compile with g++ (C++20).  It provides the CUDA built-ins
// the cupy_sce kernels use, with the semantics that matter for correctness:
//
//   * every thread of a block is a fiber (ucontext) with its own stack, so a thread can stop at
//     a barrier or a shuffle and let the others catch up, exactly where a GPU thread would;
//   * blocks run one after another; within a block, warps are picked in a pseudo-random
//     (seeded) order and each runs as far as it can before the next, as independent warps do
//     on a GPU, so code that forgets a barrier reads shared data that is not written yet, or
//     that another warp has already overwritten, and the tests see it;
//   * __syncthreads is a block barrier; a barrier that some threads never reach (divergence,
//     early exit) is reported as a deadlock instead of hanging;
//   * warp shuffles (__shfl_sync / _xor / _down / _up, any width, full or partial masks) and
//     __syncwarp exchange values through a per-warp mailbox between two warp barriers; a lane
//     outside the mask, lanes disagreeing about the mask, or a mask naming lanes that never
//     arrive are errors;
//   * __shared__ variables are `thread_local` (static storage shared by all fibers of a block);
//     dynamic shared memory (sce_host::dynamic_smem(), what the kernels' sce_dynamic_smem()
//     returns under SCE_HOST_SHIM) is a heap buffer per block of exactly the launch's size,
//     filled with 0xff bytes (NaN); more than 48 KiB needs the kernel's opt-in attribute
//     (max_dynamic_shared_size_bytes), as on a GPU, and an AddressSanitizer build reports any
//     access past the size;
//   * thread block clusters (a launch with cluster > 1): the cluster's blocks run together, their
//     warps interleaved in random order; barrier_cluster() is a barrier over all of their
//     threads and map_shared_rank() gives a pointer into another block's dynamic shared memory;
//   * atomics are real atomics; __half and __nv_bfloat16 come from CUDA's own cuda_fp16.h and
//     cuda_bf16.h host code.
//
// It cannot show speed, the weaker orderings of the GPU memory model (a fiber's writes are
// visible to the next fiber at once), bank conflicts or warp-synchronous code without _sync.
#pragma once

// The kernels' sources test this to reach the harness's shared memory and cluster hooks.
#define SCE_HOST_SHIM 1

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

// ---------------------------------------------------------------- qualifiers
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __align__
#undef __launch_bounds__
#undef __cluster_dims__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __restrict__ __restrict

namespace sce_host {

constexpr int kWarpSize = 32;
constexpr size_t kMaxDynamicSmem = 227 * 1024;      // with opt-in (H100 / H200)
constexpr unsigned kMaxCluster = 8;                 // the portable cluster size

struct Fiber;

Fiber& this_fiber();
void fail(const std::string& message);    // records the first error and parks the fiber
void barrier_block();
void barrier_cluster();
void barrier_warp(unsigned mask, const char* what);
unsigned char* dynamic_smem();                      // this block's dynamic shared memory
void* map_shared_rank(void* p, unsigned rank);      // the same offset in block `rank` of the cluster
unsigned long long& warp_slot(int lane);
int lane_id();

struct Fiber {
    uint3 thread_idx;
    int linear;
};

extern thread_local uint3 block_idx;   // of the running fiber's block
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;

template <typename V>
V shuffle(unsigned mask, V var, int src_lane, const char* what) {
    static_assert(sizeof(V) <= sizeof(unsigned long long), "shuffle of a value wider than 8 bytes");
    const int lane = lane_id();
    if (!(mask >> lane & 1u)) fail(std::string(what) + ": calling lane is not in the mask");
    unsigned long long bits = 0;
    std::memcpy(&bits, &var, sizeof(V));
    warp_slot(lane) = bits;
    barrier_warp(mask, what);      // every lane of the mask has published its value
    V result = var;
    if (src_lane >= 0 && src_lane < kWarpSize && (mask >> src_lane & 1u)) {
        std::memcpy(&result, &warp_slot(src_lane), sizeof(V));
    } else if (src_lane != lane) {
        fail(std::string(what) + ": source lane " + std::to_string(src_lane) + " is not in the mask");
    }
    barrier_warp(mask, what);      // nobody overwrites a slot before everyone has read
    return result;
}

}  // namespace sce_host

#define threadIdx (::sce_host::this_fiber().thread_idx)
#define blockIdx (::sce_host::block_idx)
#define blockDim (::sce_host::block_dim)
#define gridDim (::sce_host::grid_dim)
#define warpSize 32


inline void __syncthreads() { sce_host::barrier_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { sce_host::barrier_warp(mask, "__syncwarp"); }

template <typename V> inline V __shfl_sync(unsigned mask, V var, int src, int width = warpSize) {
    const int lane = sce_host::lane_id();
    return sce_host::shuffle(mask, var, (lane & ~(width - 1)) + (src & (width - 1)), "__shfl_sync");
}
template <typename V> inline V __shfl_xor_sync(unsigned mask, V var, int lane_mask, int width = warpSize) {
    const int lane = sce_host::lane_id();
    int src = lane ^ lane_mask;
    if (src >= (lane & ~(width - 1)) + width) src = lane;  // beyond its segment: own value
    return sce_host::shuffle(mask, var, src, "__shfl_xor_sync");
}
template <typename V> inline V __shfl_down_sync(unsigned mask, V var, unsigned delta, int width = warpSize) {
    const int lane = sce_host::lane_id();
    int src = lane + (int)delta;
    if (src >= (lane & ~(width - 1)) + width) src = lane;
    return sce_host::shuffle(mask, var, src, "__shfl_down_sync");
}
template <typename V> inline V __shfl_up_sync(unsigned mask, V var, unsigned delta, int width = warpSize) {
    const int lane = sce_host::lane_id();
    int src = lane - (int)delta;
    if (src < (lane & ~(width - 1))) src = lane;
    return sce_host::shuffle(mask, var, src, "__shfl_up_sync");
}

// ---------------------------------------------------------------- atomics
template <typename V> inline V atomicAdd(V* p, V v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float atomicAdd(float* p, float v) {
    float old = *p, desired = old + v;
    while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        desired = old + v;
    }
    return old;
}
template <typename V> inline V atomicMin(V* p, V v) {
    V old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
template <typename V> inline V atomicMax(V* p, V v) {
    V old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
template <typename V> inline V atomicOr(V* p, V v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <typename V> inline V atomicCAS(V* p, V compare, V v) {
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}

// ---------------------------------------------------------------- bit casts
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double v) { long long i; std::memcpy(&i, &v, 8); return i; }
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __fdividef(float a, float b) { return a / b; }
