// cupy_sce device helpers: numeric types, NaN-propagating max, the online log-sum-exp state,
// group (sub-warp / warp / block) all-reduce, label classification and 64-bit row offsets.
//
// Compiled by NVRTC for the GPU and, unchanged, by g++ with the host harness's shim
// (cupy_sce/testing/cuda_host_shim.h) so that the test suite executes this code on the CPU.
#pragma once
#include <cuda_fp16.h>

// Dynamic shared memory, typed by the caller: one untyped declaration serves every
// instantiation (a typed `extern __shared__` array per template would conflict).  At global
// scope, so that the host harness can define the array.
template <typename V> __device__ __forceinline__ V* sce_dynamic_smem() {
    extern __shared__ __align__(16) unsigned char sce_dynamic_smem_bytes[];
    return reinterpret_cast<V*>(sce_dynamic_smem_bytes);
}

namespace sce {

// ---------------------------------------------------------------- types

// Accumulation type: float for __half and float, double for double.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
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
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }

// max that propagates NaN (fmaxf drops it): a NaN anywhere in a row must make its loss NaN.
template <typename A> __device__ __forceinline__ A nan_max(A a, A b) {
    return (a > b || a != a) ? a : b;
}

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

// Per-thread state of one row: running max, sum of exp(x - max), the label's logit (only its
// owner lane holds it, others hold 0, so merging is a sum) and, for soft labels, sum_k label_k.
// A plain struct: it lives in shared memory, which allows no constructors.
template <typename A> struct RowState {
    A max;
    A sum;
    A picked;
    A label_sum;
};

template <typename A> __device__ __forceinline__ RowState<A> row_state_init() {
    RowState<A> s;
    s.max = -inf_value(A());
    s.sum = A(0);
    s.picked = A(0);
    s.label_sum = A(0);
    return s;
}

// Fold a chunk whose max is chunk_max: rescale the running sum once per chunk (not once per
// element), so the loop costs one exp per element.
template <typename A> __device__ __forceinline__ A rebase(RowState<A>& s, A chunk_max) {
    A new_max = nan_max(s.max, chunk_max);
    if (new_max != s.max) {
        // s.max == -inf gives exp(-inf) = 0 (sum was 0 anyway); a NaN max makes the sum NaN.
        if (new_max != -inf_value(A())) s.sum *= exp_acc(s.max - new_max);
        s.max = new_max;
    }
    return new_max;
}

// exp(x - max) for one element after rebase(); an all -inf row adds nothing (never -inf - -inf).
template <typename A> __device__ __forceinline__ void add_exp(RowState<A>& s, A x) {
    if (s.max != -inf_value(A())) s.sum += exp_acc(x - s.max);
}

template <typename A> struct MergeRowState {
    __device__ __forceinline__ RowState<A> operator()(RowState<A> a, RowState<A> b) const {
        RowState<A> r;
        r.max = nan_max(a.max, b.max);
        if (r.max == -inf_value(A())) {
            r.sum = A(0);
        } else {
            // commutative, so every lane of the butterfly ends with bit-identical values
            r.sum = a.sum * exp_acc(a.max - r.max) + b.sum * exp_acc(b.max - r.max);
        }
        r.picked = a.picked + b.picked;
        r.label_sum = a.label_sum + b.label_sum;
        return r;
    }
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
template <typename A> __device__ __forceinline__ RowState<A> shfl_xor(RowState<A> v, int lane_mask) {
    RowState<A> r;
    r.max = shfl_xor(v.max, lane_mask);
    r.sum = shfl_xor(v.sum, lane_mask);
    r.picked = shfl_xor(v.picked, lane_mask);
    r.label_sum = shfl_xor(v.label_sum, lane_mask);
    return r;
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
        v = op(v, shfl_xor(v, lane_mask));
    }
    if (group_size > 32) {
        const int warp = threadIdx.x / 32;
        if (threadIdx.x % 32 == 0) warp_partials[warp] = v;
        __syncthreads();
        v = warp_partials[0];
        for (int w = 1; w < group_size / 32; ++w) v = op(v, warp_partials[w]);
        __syncthreads();  // warp_partials is reused by the next reduction
    }
    return v;
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

}  // namespace sce
