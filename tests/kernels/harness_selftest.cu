// Kernels that exercise the host harness's CUDA built-ins (tests/test_harness.py).
#include <cuda_fp16.h>

#include "../../cupy_sce/kernels/sce_common.cuh"  // sce_dynamic_smem, cluster_sync, map_shared_rank

// Per thread, 6 results: xor 1, down 1 within width 8, up 2, broadcast of lane 3,
// a partial-mask (lower half) shfl_down, and a double shuffled by xor 16.
__global__ void selftest_shuffles(int* out, double* out_double) {
    const int t = threadIdx.x, lane = t % 32;
    out[t * 5 + 0] = __shfl_xor_sync(0xffffffffu, lane, 1);
    out[t * 5 + 1] = __shfl_down_sync(0xffffffffu, lane, 1, 8);
    out[t * 5 + 2] = __shfl_up_sync(0xffffffffu, lane, 2);
    out[t * 5 + 3] = __shfl_sync(0xffffffffu, lane * 10, 3);
    if (lane < 16) {
        out[t * 5 + 4] = __shfl_down_sync(0x0000ffffu, lane + 100, 4, 16);
    } else {
        __syncwarp(0xffff0000u);
        out[t * 5 + 4] = -1;
    }
    out_double[t] = __shfl_xor_sync(0xffffffffu, 0.5 + lane, 16);
}

// Tree reduction in static shared memory with barriers, plus an atomic counter.  BARRIER=false
// drops the barrier inside the loop: threads then read partial sums that are not written yet.
template <bool BARRIER>
__global__ void selftest_block_sum(const float* x, float* out, int* counter) {
    __shared__ float partial[1024];
    partial[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        if (BARRIER) __syncthreads();
    }
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
    atomicAdd(counter, 1);
}

// Dynamic shared memory: reverse each block.
__global__ void selftest_dynamic_reverse(const double* x, double* out) {
    double* s = sce_dynamic_smem<double>();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    s[threadIdx.x] = x[i];
    __syncthreads();
    out[i] = s[blockDim.x - 1 - threadIdx.x];
}

// Reads one element past the dynamic shared memory it was given (ASan must report it).
__global__ void selftest_dynamic_overrun(double* out) {
    double* s = sce_dynamic_smem<double>();
    s[threadIdx.x] = threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x + 1];
}

// Thread and block coordinates in 3-D.
__global__ void selftest_ids(int* out) {
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int per_block = blockDim.x * blockDim.y * blockDim.z;
    out[block * per_block + thread] = block * 1000 + thread;
}

__global__ void selftest_half(const __half* x, __half* out, float scale) {
    out[threadIdx.x] = __float2half(__half2float(x[threadIdx.x]) * scale);
}

// Deliberate misuse: the harness must report each of these, not hang or pass silently.
__global__ void selftest_divergent_barrier(int* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1;
}

__global__ void selftest_exited_lane_shuffle(int* out) {
    if (threadIdx.x % 32 == 31) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

__global__ void selftest_lane_outside_mask(int* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, (int)threadIdx.x, 1);
}

// Thread block clusters: every block writes its blockIdx into its shared memory; after a cluster
// barrier each thread reads the value of the next block of its cluster through map_shared_rank.
// BARRIER=false leaves the first barrier out: a block may then read its neighbour's shared
// memory before the neighbour wrote it (NaN bytes), or after it exited.
template <bool BARRIER>
__global__ void selftest_cluster_ring(const int cluster, float* out) {
    float* s = sce_dynamic_smem<float>();
    if (threadIdx.x == 0) s[0] = (float)blockIdx.x;
    if (BARRIER) sce::cluster_sync();
    const unsigned rank = blockIdx.x % cluster;
    out[blockIdx.x * blockDim.x + threadIdx.x] = *sce::map_shared_rank(s, (rank + 1) % cluster);
    sce::cluster_sync();  // no block exits while another may still read its shared memory
}

// A cluster barrier that one thread skips: the rest wait forever (a deadlock report).
__global__ void selftest_cluster_divergent_barrier(int* out) {
    if (blockIdx.x == 1 && threadIdx.x == 5) {
        out[0] = 1;
        return;
    }
    sce::cluster_sync();
}
