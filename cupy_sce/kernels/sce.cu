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
//                                  memory (group_size / 32 entries of the reduced type).
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

template <typename T, typename L, int VEC, bool CACHE_ROW>
__global__ void __launch_bounds__(SCE_MAX_BLOCK) cupy_sce_fused_rows(const T* x, const L* label, const T* softmax_in,
                               const typename sce::Acc<T>::type* lse_in,
                               const typename sce::Acc<T>::type* loss_grad, T* loss_out,
                               typename sce::Acc<T>::type* lse_out, T* softmax_out, T* grad_out,
                               long long n_rows, long long K, long long inner,
                               long long ignore_index, int group_size,
                               unsigned long long* bad_row) {
    typedef typename sce::Acc<T>::type A;
    const bool soft = sce::IsSoftLabel<L>::value && label != nullptr;
    const int lane = threadIdx.x % group_size;
    const long long row = (long long)blockIdx.x * (blockDim.x / group_size) + threadIdx.x / group_size;
    const bool active = row < n_rows;  // inactive threads still join every reduction
    const long long base = active ? sce::row_base(row, K, inner) : 0;
    const long long n_vec = K / VEC;   // vector chunks per row; chunk j starts at class j * VEC
    const A zero = A(0);

    sce::RowState<A>* const partials = sce_dynamic_smem<sce::RowState<A> >();
    // this group's row in shared memory (CACHE_ROW only; the host sized it, 16-byte aligned)
    sce::Vec<T, VEC>* const row_cache =
        CACHE_ROW ? reinterpret_cast<sce::Vec<T, VEC>*>(partials + 32) + (threadIdx.x / group_size) * n_vec : nullptr;

    long long lab = -1;
    const int kind = active ? sce::hard_label(label, row, K, ignore_index, &lab) : sce::LABEL_VALID;
    if (active && kind == sce::LABEL_BAD && lane == 0) sce::record_bad_row(bad_row, row);

    // ---- pass 1: online max / sum(exp) over the row (skipped when lse or softmax is given)
    sce::RowState<A> state = sce::row_state_init<A>();
    const bool need_lse = (softmax_in == nullptr && lse_in == nullptr);
    if (active && need_lse) {
        for (long long j = lane; j < n_vec; j += group_size) {
            const long long off = base + j * VEC * inner;
            const sce::Vec<T, VEC> v = sce::load_vec<T, VEC>(x + off);
            if (CACHE_ROW) row_cache[j] = v;
            A chunk_max = sce::to_acc(v.v[0]);
            for (int e = 1; e < VEC; ++e) chunk_max = sce::nan_max(chunk_max, sce::to_acc(v.v[e]));
            sce::rebase(state, chunk_max);
            for (int e = 0; e < VEC; ++e) sce::add_exp(state, sce::to_acc(v.v[e]));
        }
    }
    if (active && soft && (need_lse || grad_out != nullptr)) {
        // soft labels: the gradient needs sum_k label_k before its first element is written
        for (long long j = lane; j < n_vec; j += group_size) {
            for (int e = 0; e < VEC; ++e) state.label_sum += (A)label[base + (j * VEC + e) * inner];
        }
    }
    if (active && need_lse && kind == sce::LABEL_VALID && !soft && label != nullptr) {
        // the lane that owns the label's chunk reads its logit (it alone writes it in pass 2)
        if ((lab / VEC) % group_size == lane) state.picked = sce::to_acc(x[base + lab * inner]);
    }
    state = sce::group_allreduce(state, sce::MergeRowState<A>(), group_size, partials);

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

    if (active && lane == 0) {
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
        const T* prob_src = softmax_in != nullptr ? softmax_in : x;
        for (long long j = lane; j < n_vec; j += group_size) {
            const long long off = base + j * VEC * inner;
            // CACHE_ROW is only launched with pass 1 reading x, so the cache holds this chunk
            const sce::Vec<T, VEC> v = CACHE_ROW ? row_cache[j] : sce::load_vec<T, VEC>(prob_src + off);
            sce::Vec<T, VEC> sm, gr;
            for (int e = 0; e < VEC; ++e) {
                const long long k = j * VEC + e;
                const A xv = sce::to_acc(v.v[e]);
                const A prob = softmax_in != nullptr ? xv : sce::exp_acc((xv - shift) - log_sum_exp);
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
            if (softmax_out != nullptr) sce::store_vec<T, VEC>(softmax_out + off, sm);
            if (grad_out != nullptr) sce::store_vec<T, VEC>(grad_out + off, gr);
        }
    }
    if (soft && loss_out != nullptr) {  // uniform over the block: every thread joins
        soft_loss = sce::group_allreduce(soft_loss, sce::SumOp<A>(), group_size, sce_dynamic_smem<A>());
        if (active && lane == 0) loss_out[row] = sce::from_acc<T>(soft_loss);
    }
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
