// cupy_sce device helpers: numeric types, NaN-propagating max, the online log-sum-exp state,
// group (sub-warp / warp / block) all-reduce, label classification and 64-bit row offsets.
//
// Compiled by NVRTC for the GPU and, unchanged, by g++ with the host harness's shim
// (cupy_sce/testing/cuda_host_shim.h) so that the test suite executes this code on the CPU.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Dynamic shared memory, typed by the caller: one untyped declaration serves every
// instantiation (a typed `extern __shared__` array per template would conflict).  Under the host
// harness (SCE_HOST_SHIM) it is the running block's own buffer.
template <typename V> __device__ __forceinline__ V* sce_dynamic_smem() {
#ifdef SCE_HOST_SHIM
    // the host harness: each CTA of a cluster has its own buffer, live at the same time
    return reinterpret_cast<V*>(sce_host::dynamic_smem());
#else
    extern __shared__ __align__(16) unsigned char sce_dynamic_smem_bytes[];
    return reinterpret_cast<V*>(sce_dynamic_smem_bytes);
#endif
}

// Thread block clusters (sm_90): the compile-time cluster shape of cupy_sce_fused_cluster.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SCE_CLUSTER_DIMS(n)
#else
#define SCE_CLUSTER_DIMS(n) __cluster_dims__(n, 1, 1)
#endif

// Tuning knob (scripts/tune_gpu.py): the flush-to-zero hardware exp2 for the float terms.
#ifndef SCE_EXP2_FTZ
#define SCE_EXP2_FTZ 0
#endif

namespace sce {

// ---------------------------------------------------------------- types

// Accumulation type: float for __half, __nv_bfloat16 and float, double for double.  Each 16-bit
// logit converts to float exactly; a result is formed in float and rounded once (from_acc, to
// nearest even), so e.g. the true class's softmax - 1 never cancels in 16 bits.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// Soft labels arrive in the accumulation type; hard labels as int or long long.
template <typename L> struct IsSoftLabel { static const bool value = false; };
template <> struct IsSoftLabel<float> { static const bool value = true; };
template <> struct IsSoftLabel<double> { static const bool value = true; };

__device__ __forceinline__ float inf_value(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double inf_value(double) { return __longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ float nan_value(float) { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ double nan_value(double) { return __longlong_as_double(0x7ff8000000000000LL); }

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

// exp(d) for the per-element terms (d = x - max or x - lse, so d <= 0).  float: exp2f is one
// multiply and the hardware ex2 (2 ulp); libm-accurate expf costs about eight instructions per
// element, which on an H200 made the passes compute-bound.  The product d * log2(e) rounds
// with relative error 2**-24, so the result is within about 1e-6 relative of exp(d) for the
// terms that matter (d > -20).  double keeps exp.
__device__ __forceinline__ float exp_shifted(float d) {
#if defined(__CUDA_ARCH__) && SCE_EXP2_FTZ
    // flush-to-zero form: skips exp2f's subnormal fix-up; results below 2**-126 become 0
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d * 1.4426950408889634f));
    return r;
#else
    return exp2f(d * 1.4426950408889634f);
#endif
}
__device__ __forceinline__ double exp_shifted(double d) { return exp(d); }
__device__ __forceinline__ float tanh_acc(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_acc(double v) { return tanh(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }
__device__ __forceinline__ float expm1_acc(float v) { return expm1f(v); }
__device__ __forceinline__ double expm1_acc(double v) { return expm1(v); }
__device__ __forceinline__ float log1p_acc(float v) { return log1pf(v); }
__device__ __forceinline__ double log1p_acc(double v) { return log1p(v); }
// exp(EXP_HEADROOM + 1) stays finite and normal (float overflows at 88.7, double at 709.8);
// _numpy_backend._EXP_HEADROOM holds the same values.
__device__ __forceinline__ float exp_headroom(float) { return 80.0f; }
__device__ __forceinline__ double exp_headroom(double) { return 700.0; }

// max that propagates NaN (fmaxf drops it): a NaN anywhere in a row must make its loss NaN.
template <typename A> __device__ __forceinline__ A nan_max(A a, A b) {
    return (a > b || a != a) ? a : b;
}
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// sm_80+: one instruction instead of two compares and a select (it is in every element's path)
template <> __device__ __forceinline__ float nan_max<float>(float a, float b) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
#endif

// ---------------------------------------------------------------- row addressing

// The logits are a C-contiguous (outer, K, inner) array; row r = o * inner + i starts at
// o * K * inner + i and its classes are `inner` elements apart.  All in 64-bit: N * K may
// exceed 2**31 (e.g. 8192 x 262144).
__device__ __forceinline__ long long row_base(long long row, long long K, long long inner) {
    return (row / inner) * K * inner + row % inner;
}

// ---------------------------------------------------------------- labels

enum LabelKind { LABEL_VALID = 0, LABEL_IGNORED = 1, LABEL_BAD = 2 };

__device__ __forceinline__ int classify_label(long long label, long long K, long long ignore_index) {
    if (label == ignore_index) return LABEL_IGNORED;
    return (label < 0 || label >= K) ? LABEL_BAD : LABEL_VALID;
}

// Remember the smallest bad row; the host reads it back (one 8-byte copy) to raise IndexError.
__device__ __forceinline__ void record_bad_row(unsigned long long* bad_row, long long row) {
    if (bad_row != nullptr) atomicMin(bad_row, (unsigned long long)row);
}

// ---------------------------------------------------------------- online log-sum-exp

// Per-thread state of one row, merged over the threads (and CTAs) that share the row:
//   max, sum     running max and sum of exp(y - max) (y: the logits, soft-capped if asked)
//   picked       the label's logit y[label] (only its owner lane holds it, others 0: merging is a sum);
//                where a variant gathers it, `sum` leaves the label's own term out (see row_terms)
//   label_sum    soft labels: sum_k label_k
//   y_sum        label smoothing with hard labels: sum_k (y_k - ref), ref a logit of the row
//   label_weight soft labels with class weights: sum_k label_k * weight_k
// A plain struct: it lives in shared memory, which allows no constructors.  Which fields a kernel
// variant uses is a compile-time mask (STATE_*): the others are never shuffled, merged or stored
// into, so a variant pays only for what it computes.  SCE_STATE_FIELDS is its size in values of A
// (_cupy_backend.STATE_FIELDS; the harness reports sizeof, a test compares).
#define SCE_STATE_FIELDS 6
template <typename A> struct RowState {
    A max;
    A sum;
    A picked;
    A label_sum;
    A y_sum;
    A label_weight;
};

enum StateField : unsigned {
    STATE_LSE = 1,           // max and sum
    STATE_PICKED = 2,
    STATE_LABEL_SUM = 4,
    STATE_Y_SUM = 8,
    STATE_LABEL_WEIGHT = 16,
};

template <typename A> __device__ __forceinline__ RowState<A> row_state_init() {
    RowState<A> s;
    s.max = -inf_value(A());
    s.sum = A(0);
    s.picked = A(0);
    s.label_sum = A(0);
    s.y_sum = A(0);
    s.label_weight = A(0);
    return s;
}

// Fold a step of chunks whose max is chunk_max: rescale the running sum once per step (not once
// per element), so the loop costs one exp per element.
template <typename A> __device__ __forceinline__ void rebase(RowState<A>& s, A chunk_max) {
    A new_max = nan_max(s.max, chunk_max);
    if (new_max != s.max) {
        // s.max == -inf gives exp(-inf) = 0 (sum was 0 anyway); a NaN max makes the sum NaN.
        if (new_max != -inf_value(A())) s.sum *= exp_acc(s.max - new_max);
        s.max = new_max;
    }
}

// Merges the fields in MASK (StateField bits); the rest keep a's values.
template <typename A, unsigned MASK> struct MergeRowState {
    __device__ __forceinline__ RowState<A> operator()(RowState<A> a, RowState<A> b) const {
        RowState<A> r = a;
        if (MASK & STATE_LSE) {
            r.max = nan_max(a.max, b.max);
            if (r.max == -inf_value(A())) {
                r.sum = A(0);
            } else {
                // commutative, so every lane of the butterfly ends with bit-identical values
                r.sum = a.sum * exp_acc(a.max - r.max) + b.sum * exp_acc(b.max - r.max);
            }
        }
        if (MASK & STATE_PICKED) r.picked = a.picked + b.picked;
        if (MASK & STATE_LABEL_SUM) r.label_sum = a.label_sum + b.label_sum;
        if (MASK & STATE_Y_SUM) r.y_sum = a.y_sum + b.y_sum;
        if (MASK & STATE_LABEL_WEIGHT) r.label_weight = a.label_weight + b.label_weight;
        return r;
    }
    // the shuffle of the merged fields only (group_allreduce calls it)
    __device__ __forceinline__ RowState<A> shfl_xor(RowState<A> v, int lane_mask) const;
};

template <typename A> struct MaxOp {
    __device__ __forceinline__ A operator()(A a, A b) const { return nan_max(a, b); }
};

template <typename A> struct SumOp {
    __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};

// ---------------------------------------------------------------- shuffles

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
__device__ __forceinline__ double shfl_xor(double v, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
template <typename A, unsigned MASK>
__device__ __forceinline__ RowState<A> MergeRowState<A, MASK>::shfl_xor(RowState<A> v, int lane_mask) const {
    RowState<A> r = v;
    if (MASK & STATE_LSE) {
        r.max = sce::shfl_xor(v.max, lane_mask);
        r.sum = sce::shfl_xor(v.sum, lane_mask);
    }
    if (MASK & STATE_PICKED) r.picked = sce::shfl_xor(v.picked, lane_mask);
    if (MASK & STATE_LABEL_SUM) r.label_sum = sce::shfl_xor(v.label_sum, lane_mask);
    if (MASK & STATE_Y_SUM) r.y_sum = sce::shfl_xor(v.y_sum, lane_mask);
    if (MASK & STATE_LABEL_WEIGHT) r.label_weight = sce::shfl_xor(v.label_weight, lane_mask);
    return r;
}

// Scalar reductions shuffle the value itself.
template <typename Op, typename V> __device__ __forceinline__ V op_shfl_xor(const Op&, V v, int lane_mask) {
    return shfl_xor(v, lane_mask);
}
template <typename A, unsigned MASK>
__device__ __forceinline__ RowState<A> op_shfl_xor(const MergeRowState<A, MASK>& op, RowState<A> v, int lane_mask) {
    return op.shfl_xor(v, lane_mask);
}

// All-reduce over a group of `group_size` consecutive threads (a power of two, groups aligned;
// up to blockDim.x).  Every thread of the warp must call it (full-mask shuffles), also threads
// whose row is out of range.  Groups wider than a warp exchange warp partials through
// `warp_partials` (group_size / 32 entries of dynamic shared memory) and the whole block must call.
template <typename V, typename Op>
__device__ __forceinline__ V group_allreduce(V v, Op op, int group_size, V* warp_partials) {
    const int width = group_size < 32 ? group_size : 32;
    // xor partners stay inside an aligned power-of-two group
    for (int lane_mask = width / 2; lane_mask > 0; lane_mask /= 2) {
        v = op(v, op_shfl_xor(op, v, lane_mask));
    }
    if (group_size > 32) {
        const int warp = threadIdx.x / 32;
        const int n_warps = group_size / 32;  // a power of two, 2 .. 32
        if (threadIdx.x % 32 == 0) warp_partials[warp] = v;
        __syncthreads();
        // every warp reduces the partials itself, lane l holding partial l % n_warps: a butterfly
        // over n_warps lanes (log2 steps) instead of a serial merge of n_warps values per thread
        v = warp_partials[threadIdx.x % n_warps];
        for (int lane_mask = n_warps / 2; lane_mask > 0; lane_mask /= 2) {
            v = op(v, op_shfl_xor(op, v, lane_mask));
        }
        __syncthreads();  // warp_partials is reused by the next reduction
    }
    return v;
}

// ---------------------------------------------------------------- thread block clusters

// Barrier over every thread of every CTA of the cluster, ordering shared-memory writes before it
// against distributed-shared-memory reads after it.
__device__ __forceinline__ void cluster_sync() {
#ifdef SCE_HOST_SHIM
    sce_host::barrier_cluster();
#elif __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// The address of *p (this CTA's shared memory) in the shared memory of the cluster's CTA `rank`.
template <typename V> __device__ __forceinline__ V* map_shared_rank(V* p, unsigned rank) {
#ifdef SCE_HOST_SHIM
    return static_cast<V*>(sce_host::map_shared_rank(p, rank));
#elif __CUDA_ARCH__ >= 900
    unsigned long long mapped;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(mapped) : "l"(p), "r"(rank));
    return reinterpret_cast<V*>(mapped);
#else
    return p;
#endif
}

// All-reduce of a value every thread of each CTA already holds (after group_allreduce over the
// block) across the CLUSTER CTAs: each CTA shows its value in `slot` (its own shared memory),
// and every thread merges all of them in rank order, so every CTA gets bit-identical results.
// Every thread of every CTA must call it.
template <int CLUSTER, typename V, typename Op>
__device__ __forceinline__ V cluster_allreduce(V v, Op op, V* slot) {
    if (threadIdx.x == 0) *slot = v;
    cluster_sync();  // every CTA's slot is written
    V r = *map_shared_rank(slot, 0);
    for (unsigned c = 1; c < CLUSTER; ++c) r = op(r, *map_shared_rank(slot, c));
    cluster_sync();  // every slot is read before it is reused or its CTA exits
    return r;
}

// Rows across warps ("columns", the strided layout): thread t holds the partial of the block's
// row t % 32 from warp t / 32, which read every `slices`-th class of it.  The partials meet in
// shared memory (slices * 32 entries) and are merged in warp order, so every thread of a row gets
// bit-identical results.  The whole block must call.
template <typename V, typename Op>
__device__ __forceinline__ V column_allreduce(V v, Op op, int slices, V* partials) {
    partials[threadIdx.x] = v;
    __syncthreads();
    const int column = threadIdx.x % 32;
    v = partials[column];
    for (int s = 1; s < slices; ++s) v = op(v, partials[s * 32 + column]);
    __syncthreads();  // partials is reused by the next reduction
    return v;
}

template <typename V, typename Op>
__device__ __forceinline__ V row_allreduce(V v, Op op, int group_size, bool columns, V* partials) {
    return columns ? column_allreduce(v, op, group_size, partials) : group_allreduce(v, op, group_size, partials);
}

// ---------------------------------------------------------------- vector access

// VEC consecutive elements, loaded and stored as one 16-byte transaction when VEC * sizeof(T) == 16.
template <typename T, int VEC> struct __align__(sizeof(T) * VEC) Vec {
    T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
    return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
    *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// ---------------------------------------------------------------- block copies

// Whether both pointers are 16-byte aligned (16-byte words can move between them).
__device__ __forceinline__ bool aligned_16(const void* a, const void* b) {
    return ((reinterpret_cast<unsigned long long>(a) | reinterpret_cast<unsigned long long>(b)) & 15) == 0;
}

// `count` elements from src to dst by the whole block (every thread calls; no barrier), in 16-byte
// words taken by consecutive threads where both ends are 16-byte aligned (a block of ROWS_BLOCK
// rows spans a multiple of 16 bytes, so a 16-byte aligned array's spans all are), else element by
// element.  Global to shared memory or back (the staging knobs of sce.cu).
template <typename T>
__device__ __forceinline__ void block_copy(T* dst, const T* src, long long count) {
    typedef Vec<unsigned int, 4> Word;
    constexpr long long PER_WORD = 16 / sizeof(T);
    long long done = 0;
    if (aligned_16(dst, src)) {
        const long long words = count / PER_WORD;
        for (long long w = threadIdx.x; w < words; w += blockDim.x) {
            reinterpret_cast<Word*>(dst)[w] = reinterpret_cast<const Word*>(src)[w];
        }
        done = words * PER_WORD;
    }
    for (long long i = done + threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i];
}

// ---------------------------------------------------------------- bulk copies (sm_90)

// The 32-bit shared-state-space address of a pointer into this CTA's shared memory.
__device__ __forceinline__ unsigned shared_address(const void* p) {
#if !defined(SCE_HOST_SHIM) && __CUDA_ARCH__ >= 900
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
#else
    return static_cast<unsigned>(reinterpret_cast<unsigned long long>(p));  // unused
#endif
}

// `bytes` (a multiple of 16) from global memory at `src` to this CTA's shared memory at `dst`
// (both 16-byte aligned) by the bulk copy engine (TMA, cp.async.bulk): the whole block calls,
// thread 0 issues the copies and every thread returns once the bytes have landed (an mbarrier
// whose transaction count is the byte count; at most 2^20 - 1 bytes, more than a CTA's shared
// memory).  The issuing thread is free while the engine moves the row, and the loads in flight
// are the engine's, not 16 bytes per thread.  `slot`: 8 bytes of this CTA's dynamic shared
// memory (8-byte aligned) for the mbarrier, invalidated before this returns, so that the caller
// may use them again (no static shared memory: a launch may take the whole opt-in maximum).
// Before sm_90 (compute_80 builds): the block's threads copy 16-byte words.  The host harness
// copies at once.
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, long long bytes,
                                                    unsigned long long* slot) {
#if defined(SCE_HOST_SHIM)
    (void)slot;
    if (threadIdx.x == 0) memcpy(dst, src, (size_t)bytes);
    __syncthreads();
#elif __CUDA_ARCH__ >= 900
    constexpr long long PIECE = 1 << 16;  // bytes per cp.async.bulk (its size operand is 32-bit)
    const unsigned barrier = shared_address(slot);
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(barrier) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the engine
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(barrier), "r"((unsigned)bytes)
                     : "memory");
        for (long long done = 0; done < bytes; done += PIECE) {
            const unsigned piece = (unsigned)(bytes - done < PIECE ? bytes - done : PIECE);
            asm volatile(
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                    shared_address(static_cast<char*>(dst) + done)),
                "l"(static_cast<const char*>(src) + done), "r"(piece), "r"(barrier)
                : "memory");
        }
    }
    unsigned ready = 0;
    while (!ready) {  // phase 0 completes when the arrival and every byte are in
        asm volatile(
            "{\n\t.reg .pred done;\n\tmbarrier.try_wait.parity.shared::cta.b64 done, [%1], 0;\n\t"
            "selp.u32 %0, 1, 0, done;\n\t}"
            : "=r"(ready)
            : "r"(barrier)
            : "memory");
    }
    __syncthreads();  // every thread has seen the phase complete
    if (threadIdx.x == 0) asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(barrier) : "memory");
#else
    (void)slot;
    block_copy(static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), bytes);
    __syncthreads();
#endif
}

}  // namespace sce
