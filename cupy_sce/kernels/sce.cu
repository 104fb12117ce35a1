// cupy_sce kernels: softmax with cross entropy, forward and backward, fused.
//
// Layout (all kernels): the logits are a C-contiguous (outer, K, inner) array; a row is one
// (outer, inner) position, row = o * inner + i; its K classes are `inner` elements apart.
// Per-row arrays (label, loss, lse, loss_grad) are (outer, inner) = n_rows elements.
//
// Work split: `group_size` consecutive threads of a block share one row (a power of two):
//   * group_size == 1            : a thread per row; with inner > 1 neighbouring threads read
//                                  neighbouring addresses, so the strided axis is coalesced;
//   * 2 .. 32                    : part of a warp / a warp per row (small and medium K);
//   * == blockDim.x (64 .. 1024) : a block per row (large K), warp partials in dynamic shared
//                                  memory (group_size / 32 entries of the reduced type);
//   * inner > 1, group_size > 1  : "columns": 32 rows per block, one per lane, the block's
//                                  group_size warps split the classes; partials in dynamic
//                                  shared memory (32 * group_size entries).
// VEC > 1 (16-byte vectors) is only launched when inner == 1, K % VEC == 0 and every T
// pointer is 16-byte aligned.
//
// CACHE_ROW: the rows of a block fit in shared memory, so pass 1 keeps what it loaded and
// pass 2 (softmax, gradient, soft loss) reads it from there: one read of each row from global
// memory.  Dynamic shared memory is then [32 RowState<A> (warp partials)][one K-element row of T
// per group], and each thread reads back only the chunks it stored itself (no barrier needed).
//
// The host side (cupy_sce/_cupy_backend.py) picks the variant and launch geometry; the same
// host code drives these kernels on the CPU in the test suite (cupy_sce/testing/harness.py).
#include "sce_common.cuh"

namespace sce {

// Reads the hard label of `row` and classifies it; soft labels (and no labels) are VALID.
template <typename L>
__device__ __forceinline__ int hard_label(const L* label, long long row, long long K,
                                          long long ignore_index, long long* label_out) {
    if (IsSoftLabel<L>::value || label == nullptr) {
        *label_out = -1;
        return LABEL_VALID;
    }
    const long long lab = (long long)label[row];
    *label_out = lab;
    return classify_label(lab, K, ignore_index);
}

}  // namespace sce

// ------------------------------------------------------------------------------------------
// cupy_sce_fused_rows: every op of the library in one kernel, steered by which pointers are null.
//
//   forward                 x, label            -> loss_out, lse_out [, softmax_out]
//   forward + backward      x, label, loss_grad -> loss_out, grad_out (grad_out may be x)
//   backward from lse       x, lse_in, label, loss_grad -> grad_out (grad_out may be x)
//   backward from softmax   softmax_in, label, loss_grad -> grad_out
//   logsumexp (block 2)     x                   -> lse_out
//
// Arguments
//   x           const T*  logits, (outer, K, inner); null when softmax_in is given
//   label       const L*  hard: (outer, inner) int/long long; soft: (outer, K, inner) in A; may be null
//   softmax_in  const T*  probabilities (Paddle's grad op); null otherwise
//   lse_in      const A*  (outer, inner) log-sum-exp from forward(); null otherwise
//   loss_grad   const A*  (outer, inner) upstream gradient; null means ones
//   loss_out    T*        (outer, inner) loss; may be null
//   lse_out     A*        (outer, inner) log-sum-exp; may be null
//   softmax_out T*        (outer, K, inner) softmax; may be null
//   grad_out    T*        (outer, K, inner) gradient; may be null; may alias x (in place): every
//                         element is read and written by the same thread, and the label's logit
//                         is read in pass 1 by the lane that later writes that element
//   n_rows      outer * inner
//   K           classes (row length); inner: distance between classes of a row (elements)
//   ignore_index  hard label value that marks a row as ignored (loss 0, gradient 0)
//   group_size  threads per row (see the header)
//   bad_row     smallest row with an out-of-range hard label (atomicMin); may be null
// ------------------------------------------------------------------------------------------
// The largest block the host launches (_cupy_backend.GROUP_TABLE): the compiler must fit a
// thread's registers in 64K / MAX_BLOCK, or the launch fails ("too many resources requested").
#define SCE_MAX_BLOCK 1024
// Tuning knobs (scripts/tune_gpu.py compiles variants with -D): chunks loaded per step (0: by
// type) and whether pass 1 loads the next step before the arithmetic of the current one.
#ifndef SCE_UNROLL
#define SCE_UNROLL 0
#endif
#ifndef SCE_PREFETCH
#define SCE_PREFETCH 0
#endif

// Warp partials (group_allreduce) and, at index 32, the slot a CTA shows the rest of its cluster
// (cluster_allreduce); the row cache starts after them.  _cupy_backend.STATE_SLOTS matches.
#define SCE_STATE_SLOTS 33

#define SCE_FUSED_PARAMS                                                                          \
    const T *x, const L *label, const T *softmax_in, const typename sce::Acc<T>::type *lse_in,    \
        const typename sce::Acc<T>::type *loss_grad, T *loss_out, typename sce::Acc<T>::type *lse_out, \
        T *softmax_out, T *grad_out, long long n_rows, long long K, long long inner,              \
        long long ignore_index, int group_size, unsigned long long *bad_row
#define SCE_FUSED_ARGS                                                                            \
    x, label, softmax_in, lse_in, loss_grad, loss_out, lse_out, softmax_out, grad_out, n_rows, K, \
        inner, ignore_index, group_size, bad_row

namespace sce {

// The body of both fused kernels.  CLUSTER > 1 (cupy_sce_fused_cluster): a row is split over the
// CLUSTER CTAs of a thread block cluster (one row per cluster, group_size == blockDim.x), each
// CTA keeps its segment of the row in its shared memory (CACHE_ROW), and the CTAs merge their
// row states through distributed shared memory: one read of the row from global memory even
// when it is larger than one CTA's shared memory.
template <typename T, typename L, int VEC, bool CACHE_ROW, int CLUSTER>
__device__ __forceinline__ void fused_rows(SCE_FUSED_PARAMS) {
    typedef typename sce::Acc<T>::type A;
    // chunks a thread loads before it uses the first (16-byte loads in flight per thread);
    // double keeps two, so that its registers fit under the launch bound without spilling
    constexpr int UNROLL = SCE_UNROLL > 0 ? SCE_UNROLL : (sizeof(A) == 8 ? 2 : 4);
    const bool soft = sce::IsSoftLabel<L>::value && label != nullptr;
    // Strided rows (inner > 1) with group_size > 1: "columns".  A block holds 32 consecutive rows,
    // one per lane, and its group_size warps split the classes (warp w reads classes w, w + S, ...
    // of all 32 rows: neighbouring lanes read neighbouring addresses).  Otherwise group_size
    // consecutive threads share a row.
    const bool columns = inner > 1 && group_size > 1;
    const int lane = columns ? threadIdx.x / 32 : threadIdx.x % group_size;
    const long long row = CLUSTER > 1 ? (long long)(blockIdx.x / CLUSTER)
                          : columns   ? (long long)blockIdx.x * 32 + threadIdx.x % 32
                                      : (long long)blockIdx.x * (blockDim.x / group_size) + threadIdx.x / group_size;
    const bool active = row < n_rows;  // inactive threads still join every reduction
    const long long base = active ? sce::row_base(row, K, inner) : 0;
    const long long n_vec = K / VEC;   // vector chunks per row; chunk j starts at class j * VEC
    const long long vec_stride = VEC * inner;  // elements from chunk j to chunk j + 1
    // this CTA's chunks of the row: [seg_begin, seg_end); the whole row without a cluster.  The
    // cluster's CTAs are consecutive blocks, rank = blockIdx.x % CLUSTER (cluster dims (C, 1, 1)).
    const unsigned rank = CLUSTER > 1 ? blockIdx.x % CLUSTER : 0;
    const long long seg_chunks = (n_vec + CLUSTER - 1) / CLUSTER;
    const long long seg_begin = rank * seg_chunks < n_vec ? rank * seg_chunks : n_vec;
    const long long seg_end = seg_begin + seg_chunks < n_vec ? seg_begin + seg_chunks : n_vec;
    const A zero = A(0);

    RowState<A>* const partials = sce_dynamic_smem<RowState<A> >();
    // this group's segment in shared memory (CACHE_ROW only; the host sized it, 16-byte aligned);
    // chunk j sits at row_cache[j - seg_begin]
    Vec<T, VEC>* const row_cache =
        CACHE_ROW ? reinterpret_cast<Vec<T, VEC>*>(partials + SCE_STATE_SLOTS) + (threadIdx.x / group_size) * seg_chunks
                  : nullptr;

    long long lab = -1;
    const int kind = active ? sce::hard_label(label, row, K, ignore_index, &lab) : sce::LABEL_VALID;
    if (active && kind == sce::LABEL_BAD && lane == 0) sce::record_bad_row(bad_row, row);

    // ---- pass 1: online max / sum(exp) over the row (skipped when lse or softmax is given)
    sce::RowState<A> state = sce::row_state_init<A>();
    const bool need_lse = (softmax_in == nullptr && lse_in == nullptr);
    if (active && need_lse) {
        const T* const x_row = x + base;
        const long long step = (long long)group_size * UNROLL;
        // the UNROLL chunks of the step starting at chunk j0 (those inside the segment)
        auto load_step = [&](sce::Vec<T, VEC>* dst, long long j0) {
            for (int u = 0; u < UNROLL; ++u) {
                const long long j = j0 + (long long)u * group_size;
                if (j < seg_end) dst[u] = sce::load_vec<T, VEC>(x_row + j * vec_stride);
            }
        };
        // every load of a step is issued before the first use (one load at a time per thread left
        // an H200's memory system half idle); SCE_PREFETCH also issues the next step's loads
        // before this step's arithmetic
        sce::Vec<T, VEC> v[UNROLL], next[UNROLL];
        load_step(v, seg_begin + lane);
        for (long long j0 = seg_begin + lane; j0 < seg_end; j0 += step) {
            if (SCE_PREFETCH) load_step(next, j0 + step);
            A step_max = -sce::inf_value(A());
            for (int u = 0; u < UNROLL; ++u) {
                const long long j = j0 + (long long)u * group_size;
                if (j >= seg_end) continue;
                if (CACHE_ROW) row_cache[j - seg_begin] = v[u];
                for (int e = 0; e < VEC; ++e) step_max = sce::nan_max(step_max, sce::to_acc(v[u].v[e]));
            }
            sce::rebase(state, step_max);
            if (state.max != -sce::inf_value(A())) {  // all -inf so far: nothing to add
                for (int u = 0; u < UNROLL; ++u) {
                    if (j0 + (long long)u * group_size >= seg_end) continue;
                    for (int e = 0; e < VEC; ++e) state.sum += sce::exp_shifted(sce::to_acc(v[u].v[e]) - state.max);
                }
            }
            if (SCE_PREFETCH) {
                for (int u = 0; u < UNROLL; ++u) v[u] = next[u];
            } else {
                load_step(v, j0 + step);
            }
        }
    }
    if (active && soft && (need_lse || grad_out != nullptr)) {
        // soft labels: the gradient needs sum_k label_k before its first element is written
        for (long long j = seg_begin + lane; j < seg_end; j += group_size) {
            for (int e = 0; e < VEC; ++e) state.label_sum += (A)label[base + (j * VEC + e) * inner];
        }
    }
    if (active && need_lse && kind == sce::LABEL_VALID && !soft && label != nullptr) {
        // the lane that owns the label's chunk reads its logit (it alone writes it in pass 2)
        const long long label_chunk = lab / VEC;
        if (label_chunk >= seg_begin && label_chunk < seg_end && (label_chunk - seg_begin) % group_size == lane) {
            state.picked = sce::to_acc(x[base + lab * inner]);
        }
    }
    state = sce::row_allreduce(state, sce::MergeRowState<A>(), group_size, columns, partials);
    if (CLUSTER > 1) {
        state = sce::cluster_allreduce<CLUSTER>(state, sce::MergeRowState<A>(), partials + SCE_STATE_SLOTS - 1);
    }

    // lse = shift + log_sum_exp, kept apart: log_sum_exp + (shift - x_k) is exact where
    // lse - x_k would first round a large lse.  An all -inf row has shift 0 and lse -inf.
    A shift, log_sum_exp;
    if (need_lse) {
        shift = state.max == -sce::inf_value(A()) ? zero : state.max;
        log_sum_exp = sce::log_acc(state.sum);
    } else {
        shift = lse_in != nullptr && active ? lse_in[row] : zero;
        log_sum_exp = zero;
    }
    const A g = (loss_grad != nullptr && active) ? loss_grad[row] : A(1);

    if (active && lane == 0 && rank == 0) {
        if (lse_out != nullptr) lse_out[row] = shift + log_sum_exp;
        if (loss_out != nullptr && !soft) {
            A loss = log_sum_exp + (shift - state.picked);             // lse - x[label]
            if (kind == sce::LABEL_IGNORED) loss = zero;
            if (kind == sce::LABEL_BAD) loss = sce::nan_value(A());    // only reached unchecked
            loss_out[row] = sce::from_acc<T>(loss);
        }
    }

    // ---- pass 2: probabilities, soft loss, softmax and gradient
    const bool need_pass2 = (soft && loss_out != nullptr) || softmax_out != nullptr || grad_out != nullptr;
    A soft_loss = zero;
    if (active && need_pass2) {
        const T* const src_row = (softmax_in != nullptr ? softmax_in : x) + base;
        // several global loads in flight when pass 2 re-reads the row; from the row cache one chunk
        // at a time (shared memory is near, and a wide unrolled body only costs registers)
        constexpr int UNROLL2 = CACHE_ROW ? 1 : UNROLL;
        for (long long j0 = seg_begin + lane; j0 < seg_end; j0 += (long long)group_size * UNROLL2) {
            sce::Vec<T, VEC> v[UNROLL2];
            for (int u = 0; u < UNROLL2; ++u) {
                const long long j = j0 + (long long)u * group_size;
                // CACHE_ROW is only launched with pass 1 reading x, so the cache holds this chunk
                if (j < seg_end) {
                    v[u] = CACHE_ROW ? row_cache[j - seg_begin] : sce::load_vec<T, VEC>(src_row + j * vec_stride);
                }
            }
            for (int u = 0; u < UNROLL2; ++u) {
                const long long j = j0 + (long long)u * group_size;
                if (j >= seg_end) continue;
                sce::Vec<T, VEC> sm, gr;
                for (int e = 0; e < VEC; ++e) {
                    const long long k = j * VEC + e;
                    const A xv = sce::to_acc(v[u].v[e]);
                    const A prob = softmax_in != nullptr ? xv : sce::exp_shifted((xv - shift) - log_sum_exp);
                    sm.v[e] = sce::from_acc<T>(prob);
                    A grad;
                    if (soft) {
                        const A lk = label[base + k * inner];
                        // a zero label adds 0 even at x_k = -inf (0 * inf would be NaN)
                        if (lk != zero && loss_out != nullptr) soft_loss += lk * (log_sum_exp + (shift - xv));
                        // d/dx_k sum_j l_j (lse - x_j) = softmax_k * sum_j(l_j) - l_k
                        grad = (prob * state.label_sum - lk) * g;
                    } else if (kind == sce::LABEL_IGNORED) {
                        grad = zero;  // selected, not multiplied: the row's logits may be NaN or inf
                    } else if (kind == sce::LABEL_BAD) {
                        grad = sce::nan_value(A());
                    } else {
                        // d/dx_k (lse - x_label) = softmax_k - [k == label], formed in A before the
                        // rounding to T (float16 softmax - 1 would cancel)
                        grad = (prob - (k == lab ? A(1) : zero)) * g;
                    }
                    gr.v[e] = sce::from_acc<T>(grad);
                }
                // in place (grad_out == x): this thread loaded chunk j above, before this store
                if (softmax_out != nullptr) sce::store_vec<T, VEC>(softmax_out + base + j * vec_stride, sm);
                if (grad_out != nullptr) sce::store_vec<T, VEC>(grad_out + base + j * vec_stride, gr);
            }
        }
    }
    if (soft && loss_out != nullptr) {  // uniform over the block: every thread joins
        soft_loss = sce::row_allreduce(soft_loss, sce::SumOp<A>(), group_size, columns, sce_dynamic_smem<A>());
        if (CLUSTER > 1) {
            soft_loss = sce::cluster_allreduce<CLUSTER>(
                soft_loss, sce::SumOp<A>(), reinterpret_cast<A*>(partials + SCE_STATE_SLOTS - 1));
        }
        if (active && lane == 0 && rank == 0) loss_out[row] = sce::from_acc<T>(soft_loss);
    }
}

}  // namespace sce

template <typename T, typename L, int VEC, bool CACHE_ROW>
__global__ void __launch_bounds__(SCE_MAX_BLOCK) cupy_sce_fused_rows(SCE_FUSED_PARAMS) {
    sce::fused_rows<T, L, VEC, CACHE_ROW, 1>(SCE_FUSED_ARGS);
}

// ------------------------------------------------------------------------------------------
// cupy_sce_fused_cluster: cupy_sce_fused_rows for rows whose cache does not fit one CTA's shared
// memory.  Arguments as above; grid = n_rows * CLUSTER blocks of group_size threads; dynamic
// shared memory SCE_STATE_SLOTS RowState<A> + ceil(K / VEC / CLUSTER) vectors (the host opts in
// above 48 KiB).  Always CACHE_ROW; pass 1 reads x (forward and fused forward+backward).
// Needs sm_90 (thread block clusters); the host launches it only there.
// ------------------------------------------------------------------------------------------
template <typename T, typename L, int VEC, int CLUSTER>
__global__ void __launch_bounds__(SCE_MAX_BLOCK) SCE_CLUSTER_DIMS(CLUSTER) cupy_sce_fused_cluster(SCE_FUSED_PARAMS) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    __trap();  // no clusters before sm_90 (compiled so that one module serves every device)
#else
    sce::fused_rows<T, L, VEC, true, CLUSTER>(SCE_FUSED_ARGS);
#endif
}

// ------------------------------------------------------------------------------------------
// cupy_sce_row_max (building block 1): row_max_out[row] = max_k x[row, k], NaN propagating.
//   x (outer, K, inner) logits; row_max_out (outer, inner) in A; other arguments as above.
//   Dynamic shared memory: group_size / 32 values of A when group_size > 32.
// ------------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(SCE_MAX_BLOCK) cupy_sce_row_max(const T* x, typename sce::Acc<T>::type* row_max_out, long long n_rows,
                            long long K, long long inner, int group_size) {
    typedef typename sce::Acc<T>::type A;
    const int lane = threadIdx.x % group_size;
    const long long row = (long long)blockIdx.x * (blockDim.x / group_size) + threadIdx.x / group_size;
    const bool active = row < n_rows;
    const long long base = active ? sce::row_base(row, K, inner) : 0;
    A m = -sce::inf_value(A());
    if (active) {
        for (long long j = lane; j < K / VEC; j += group_size) {
            const sce::Vec<T, VEC> v = sce::load_vec<T, VEC>(x + base + j * VEC * inner);
            for (int e = 0; e < VEC; ++e) m = sce::nan_max(m, sce::to_acc(v.v[e]));
        }
    }
    m = sce::group_allreduce(m, sce::MaxOp<A>(), group_size, sce_dynamic_smem<A>());
    if (active && lane == 0) row_max_out[row] = m;
}

// ------------------------------------------------------------------------------------------
// cupy_sce_gather_label (building block 3): one thread per row.
//   picked_out[row] = x[row, label[row]] (0 where ignored or out of range: never read there);
//   an out-of-range label records its row in bad_row (atomicMin; may be null).
//   x (outer, K, inner) logits; label (outer, inner) int/long long; picked_out (outer, inner) in A.
// ------------------------------------------------------------------------------------------
template <typename T, typename L>
__global__ void cupy_sce_gather_label(const T* x, const L* label, typename sce::Acc<T>::type* picked_out,
                                 long long n_rows, long long K, long long inner,
                                 long long ignore_index, unsigned long long* bad_row) {
    typedef typename sce::Acc<T>::type A;
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n_rows) return;  // no reduction here, so threads may leave early
    long long lab;
    const int kind = sce::hard_label(label, row, K, ignore_index, &lab);
    A picked = A(0);
    if (kind == sce::LABEL_VALID) picked = sce::to_acc(x[sce::row_base(row, K, inner) + lab * inner]);
    if (kind == sce::LABEL_BAD) sce::record_bad_row(bad_row, row);
    picked_out[row] = picked;
}
