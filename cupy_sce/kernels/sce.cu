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

// ------------------------------------------------------------------------------------------
// cupy_sce_rows<T, L, OP, F, VEC, CACHE_ROW>: every operation of the library, one compiled variant
// per operation OP (sce::Op) and set of optional features F (sce::Feature bits).  Everything a
// variant does not compute is compiled out: no loads, no registers, no arithmetic for it.
//
//   OP_LSE               x                            -> lse_out                 (building block 2)
//   OP_FORWARD           x, label                     -> loss_out [, lse_out]
//   OP_FORWARD_SOFTMAX   x, label                     -> loss_out, softmax_out   (Paddle's op; F = 0)
//   OP_FORWARD_BACKWARD  x, label, loss_grad          -> loss_out, grad_out (grad_out may be x)
//   OP_BACKWARD_LSE      x, lse_in, label, loss_grad  -> grad_out (grad_out may be x)
//   OP_BACKWARD_SOFTMAX  softmax_in, label, loss_grad -> grad_out                (Paddle's grad op; F = 0)
//
// Features (the loss family; see README "Semantics"): with y = the logits, or softcap * tanh(x /
// softcap) under F_SOFTCAP, a row's target t (one-hot of the label, or the soft label; under
// F_SMOOTH (1 - smoothing) * t + smoothing / K), its weight w (1, or under F_WEIGHT sum_k t_k *
// weight_k) and lse = log sum_k exp(y_k):
//   loss   = w * (sum_k t_k (lse - y_k) + z_loss * lse^2)                  (z_loss: F_ZLOSS)
//   grad_k = loss_grad * w * (softmax_k * (sum_k t_k + 2 z_loss lse) - t_k) * dy_k/dx_k
//
// Arguments (unused ones of a variant are null / ignored)
//   x            const T*  logits, (outer, K, inner)
//   label        const L*  hard: (outer, inner) int/long long; soft: (outer, K, inner) in A
//   softmax_in   const T*  (outer, K, inner) probabilities (OP_BACKWARD_SOFTMAX)
//   lse_in       const A*  (outer, inner) log-sum-exp of y from a forward (OP_BACKWARD_LSE)
//   loss_grad    const A*  (outer, inner) upstream gradient per row; null means ones
//   weight       const A*  (K) class weights (F_WEIGHT)
//   weight_sum   const A*  one value, sum_k weight_k (F_WEIGHT with F_SMOOTH)
//   loss_out     A*        (outer, inner) loss per row, in A (the host rounds to T or reduces)
//   lse_out      A*        (outer, inner) log-sum-exp of y; may be null
//   softmax_out  T*        (outer, K, inner) softmax
//   grad_out     T*        (outer, K, inner) gradient; may alias x (in place): every element is
//                          read and written by the same thread, and the label's logit is read in
//                          pass 1 by the lane that later writes that element
//   n_rows       outer * inner
//   K            classes (row length); inner: distance between classes of a row (elements)
//   ignore_index hard label value that marks a row as ignored (loss 0, gradient 0, weight 0)
//   smoothing    label smoothing in [0, 1) (F_SMOOTH)
//   z_loss       z-loss coefficient >= 0 (F_ZLOSS)
//   softcap      logit cap > 0 (F_SOFTCAP)
//   group_size   threads per row (see the header)
//   bad_row      smallest row with an out-of-range hard label (atomicMin); may be null
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
// Pass 1's per-element work: 1 tests for the label's chunk once per chunk (not a 64-bit compare and
// a branch per element) and keeps one partial sum per unrolled chunk (no chain of dependent adds
// through state.sum); 0 is the plain loop.  The sums are grouped differently, so the bits differ.
// (A flush-to-zero exp for the sum's terms would be wrong here: with the label's term left out, a
// confident row's sum holds only terms that may all be subnormal, and its loss is their log1p.)
#ifndef SCE_LEAN_PASS1
#define SCE_LEAN_PASS1 0
#endif
// Short rows, a thread each (group_size 1, contiguous rows) with the row cache: 1 moves the
// block's rows between global and shared memory as one contiguous span, the block's threads taking
// 16-byte words in turn (stage_in / stage_out), and the thread that owns a row works on it in
// shared memory; 0 lets each thread read and write its own row, so that a warp's access touches
// 32 rows K elements apart.  The bits are the same either way.
#ifndef SCE_STAGE_ROWS
#define SCE_STAGE_ROWS 0
#endif
// Every cached launch of contiguous rows (the row cache of a block's rows, or a cluster CTA's
// segment of its row): 1 has the bulk copy engine (sm_90's TMA, cp.async.bulk) fill the cache
// before pass 1, which then reads it from there, and the threads issue no loads of their own;
// 0 lets pass 1 load 16 bytes at a time per thread and keep what it loaded.  The bits are the
// same either way.
#ifndef SCE_BULK_STAGE
#define SCE_BULK_STAGE 0
#endif

// Warp partials (group_allreduce) and, at index 32, the slot a CTA shows the rest of its cluster
// (cluster_allreduce); the row cache starts after them (at the next multiple of 16 bytes).  _cupy_backend.STATE_SLOTS matches (the
// harness reports this value; a test compares).
#define SCE_STATE_SLOTS 33
// Rows per block in the strided "columns" layout (_cupy_backend.COLUMN_ROWS; checked likewise).
#define SCE_COLUMN_ROWS 32

#define SCE_ROWS_PARAMS                                                                            \
    const T *x, const L *label, const T *softmax_in, const typename sce::Acc<T>::type *lse_in,     \
        const typename sce::Acc<T>::type *loss_grad, const typename sce::Acc<T>::type *weight,     \
        const typename sce::Acc<T>::type *weight_sum, typename sce::Acc<T>::type *loss_out,        \
        typename sce::Acc<T>::type *lse_out, T *softmax_out, T *grad_out, long long n_rows,        \
        long long K, long long inner, long long ignore_index, typename sce::Acc<T>::type smoothing, \
        typename sce::Acc<T>::type z_loss, typename sce::Acc<T>::type softcap, int group_size,     \
        unsigned long long *bad_row
#define SCE_ROWS_ARGS                                                                             \
    x, label, softmax_in, lse_in, loss_grad, weight, weight_sum, loss_out, lse_out, softmax_out,  \
        grad_out, n_rows, K, inner, ignore_index, smoothing, z_loss, softcap, group_size, bad_row

namespace sce {

enum Op {
    OP_LSE = 0,
    OP_FORWARD = 1,
    OP_FORWARD_SOFTMAX = 2,
    OP_FORWARD_BACKWARD = 3,
    OP_BACKWARD_LSE = 4,
    OP_BACKWARD_SOFTMAX = 5,
};

enum Feature {
    F_WEIGHT = 1,   // class weights
    F_SMOOTH = 2,   // label smoothing
    F_ZLOSS = 4,    // z-loss
    F_SOFTCAP = 8,  // logit soft-capping
};

// What a variant computes, all compile-time.
template <typename L, int OP, int F> struct Plan {
    static constexpr bool soft = IsSoftLabel<L>::value;
    static constexpr bool labels = OP != OP_LSE;
    static constexpr bool lse_pass = OP == OP_LSE || OP == OP_FORWARD || OP == OP_FORWARD_SOFTMAX ||
                                     OP == OP_FORWARD_BACKWARD;  // pass 1 computes the lse
    static constexpr bool loss = OP == OP_FORWARD || OP == OP_FORWARD_SOFTMAX || OP == OP_FORWARD_BACKWARD;
    static constexpr bool softmax = OP == OP_FORWARD_SOFTMAX;
    static constexpr bool grad = OP == OP_FORWARD_BACKWARD || OP == OP_BACKWARD_LSE || OP == OP_BACKWARD_SOFTMAX;
    static constexpr bool pass2 = softmax || grad || (soft && loss);  // a second sweep over the row
    static constexpr bool weight = (F & F_WEIGHT) != 0;
    static constexpr bool smooth = (F & F_SMOOTH) != 0;
    static constexpr bool zloss = (F & F_ZLOSS) != 0;
    static constexpr bool softcap = (F & F_SOFTCAP) != 0;
    // soft labels: sum_k label_k (the gradient's sum_k t_k) and sum_k label_k w_k (the row weight)
    static constexpr bool label_sums = soft && grad;
    static constexpr unsigned state_mask =
        (lse_pass ? STATE_LSE : 0u) | (lse_pass && loss && !soft ? STATE_PICKED : 0u) |
        (soft && (grad || weight) ? STATE_LABEL_SUM : 0u) | (lse_pass && loss && !soft && smooth ? STATE_Y_SUM : 0u) |
        (soft && weight ? STATE_LABEL_WEIGHT : 0u);
};

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

// y: the logit the loss sees (Gemma 2's soft cap: softcap * tanh(x / softcap), else x).
template <bool SOFTCAP, typename A> __device__ __forceinline__ A capped(A x, A softcap) {
    return SOFTCAP ? softcap * tanh_acc(x / softcap) : x;
}

// dy/dx of the cap from x: 1 - tanh(u)^2 = 4 e / (1 + e)^2 with e = exp(-2 |u|), u = x / c, which is
// relatively exact at every u.  (From y, (1 - y / c) (1 + y / c) inherits tanh's absolute rounding:
// near saturation, 1 - y / c = 1e-5, that is 1% of the slope.)  x = +-inf gives 0, NaN gives NaN.
template <bool SOFTCAP, typename A> __device__ __forceinline__ A cap_slope(A x, A softcap) {
    if (!SOFTCAP) return A(1);
    const A u = x / softcap;
    const A e = exp_shifted(A(-2) * (u < A(0) ? -u : u));
    return A(4) * e / ((A(1) + e) * (A(1) + e));
}

// What label smoothing's sum_k y_k is taken against: the row's first (capped) logit when finite,
// else 0.  sum_k (y_k - ref) then holds the spread of the logits, not their common offset, which
// would cancel in lse - mean_k y_k (logits near 1e4 would lose 4 digits of the loss).
template <bool SOFTCAP, typename T, typename A>
__device__ __forceinline__ A smoothing_reference(const T* x_row, A softcap) {
    const A y0 = capped<SOFTCAP>(to_acc(x_row[0]), softcap);
    return y0 - y0 == A(0) ? y0 : A(0);  // inf - inf and NaN are not 0
}

// Bytes of the SCE_STATE_SLOTS row states ahead of the row cache, rounded up to 16 so that the
// cache's 16-byte vectors stay aligned (_cupy_backend.state_area_bytes matches).
template <typename A> __device__ __forceinline__ constexpr long long state_area_bytes() {
    return (SCE_STATE_SLOTS * (long long)sizeof(RowState<A>) + 15) / 16 * 16;
}

// Where a thread works: its row, its lane among the row's threads, and its CTA's segment of the row.
struct RowPlace {
    long long row;
    int lane;
    bool active;        // row < n_rows; inactive threads still join every reduction
    bool columns;       // strided rows: 32 rows per block, warps split the classes
    long long base;     // offset of the row's class 0
    long long seg_chunks;          // vector chunks per CTA: ceil(K / VEC / CLUSTER)
    long long seg_begin, seg_end;  // this CTA's vector chunks [seg_begin, seg_end)
    unsigned rank;      // CTA rank in the cluster (0 without one)
};

template <int VEC, int CLUSTER>
__device__ __forceinline__ RowPlace place_thread(long long n_rows, long long K, long long inner, int group_size) {
    RowPlace p;
    p.columns = inner > 1 && group_size > 1;
    p.lane = p.columns ? threadIdx.x / SCE_COLUMN_ROWS : threadIdx.x % group_size;
    p.row = CLUSTER > 1 ? (long long)(blockIdx.x / CLUSTER)
            : p.columns ? (long long)blockIdx.x * SCE_COLUMN_ROWS + threadIdx.x % SCE_COLUMN_ROWS
                        : (long long)blockIdx.x * (blockDim.x / group_size) + threadIdx.x / group_size;
    p.active = p.row < n_rows;
    p.base = p.active ? row_base(p.row, K, inner) : 0;
    // the cluster's CTAs are consecutive blocks, rank = blockIdx.x % CLUSTER (cluster dims (C, 1, 1))
    const long long n_vec = K / VEC;
    p.rank = CLUSTER > 1 ? blockIdx.x % CLUSTER : 0;
    p.seg_chunks = (n_vec + CLUSTER - 1) / CLUSTER;
    p.seg_begin = p.rank * p.seg_chunks < n_vec ? p.rank * p.seg_chunks : n_vec;
    p.seg_end = p.seg_begin + p.seg_chunks < n_vec ? p.seg_begin + p.seg_chunks : n_vec;
    return p;
}

// Chunks a thread loads before it uses the first (16-byte loads in flight per thread) in pass 1
// (PASS == 1) and in pass 2: 4, or 2 where the registers would not fit the launch bound's 64
// without spilling (ptxas spills, checked by tests/test_kernels.py, cost 16-bit types half their
// speed on an H200): double; pass 1 with a soft cap (it keeps the step's UNROLL * VEC capped
// logits); pass 2 of 16-bit types (a chunk is 8 elements, each with its gradient's terms).
template <typename A, int VEC, bool SOFTCAP, int PASS> __device__ __forceinline__ constexpr int unroll() {
    return SCE_UNROLL > 0 ? SCE_UNROLL
           : sizeof(A) == 8 || (PASS == 1 ? SOFTCAP && VEC > 1 : VEC > 4) ? 2 : 4;
}

// Step 2 (pass 1): the online max / sum of exp(y) over this thread's chunks, the label's logit
// (read by the lane that owns its chunk, the one that writes it in pass 2), and the sums the
// features need; CACHE_ROW keeps the chunks in shared memory for pass 2.
template <typename T, typename L, int OP, int F, int VEC, bool CACHE_ROW>
__device__ __forceinline__ RowState<typename Acc<T>::type> pass1_row_state(
        const T* x, const L* label, const typename Acc<T>::type* weight, long long K, long long inner,
        int group_size, const RowPlace& at, long long lab, int kind, typename Acc<T>::type softcap,
        Vec<T, VEC>* row_cache, bool staged) {
    typedef typename Acc<T>::type A;
    typedef Plan<L, OP, F> P;
    constexpr int UNROLL = unroll<A, VEC, P::softcap, 1>();
    RowState<A> state = row_state_init<A>();
    if (!at.active) return state;
    const long long vec_stride = VEC * inner;  // elements from chunk j to chunk j + 1
    if (P::lse_pass) {
        const T* const x_row = x + at.base;
        const long long step = (long long)group_size * UNROLL;
        // the UNROLL chunks of the step starting at chunk j0 (those inside the segment)
        auto load_step = [&](Vec<T, VEC>* dst, long long j0) {
            for (int u = 0; u < UNROLL; ++u) {
                const long long j = j0 + (long long)u * group_size;
                // staged: the block put the row in the cache already (stage_in)
                if (j < at.seg_end) dst[u] = staged ? row_cache[j - at.seg_begin] : load_vec<T, VEC>(x_row + j * vec_stride);
            }
        };
        // every load of a step is issued before the first use (one load at a time per thread left
        // an H200's memory system half idle); SCE_PREFETCH also issues the next step's loads
        // before this step's arithmetic
        const A y_ref = (P::state_mask & STATE_Y_SUM) ? smoothing_reference<P::softcap>(x_row, softcap) : A(0);
        const bool skip_label = (P::state_mask & STATE_PICKED) && kind == LABEL_VALID;
        const long long label_chunk = skip_label ? lab / VEC : -1;  // SCE_LEAN_PASS1: where the label is
        const int label_lane = skip_label ? (int)(lab - label_chunk * VEC) : -1;
        Vec<T, VEC> v[UNROLL], next[UNROLL];
        load_step(v, at.seg_begin + at.lane);
        for (long long j0 = at.seg_begin + at.lane; j0 < at.seg_end; j0 += step) {
            if (SCE_PREFETCH) load_step(next, j0 + step);
            // y of element e of chunk u: kept from the max loop under a soft cap (tanh is dear),
            // else converted again from the loaded chunk: a 16-bit step's UNROLL * VEC floats kept
            // beside the loads would not fit the 64 registers of a 1024-thread block (they spilled)
            constexpr int KEPT_U = P::softcap ? UNROLL : 1, KEPT_E = P::softcap ? VEC : 1;
            A y_kept[KEPT_U][KEPT_E];
            auto y = [&](int u, int e) -> A {
                return P::softcap ? y_kept[u % KEPT_U][e % KEPT_E] : to_acc(v[u].v[e]);
            };
            A step_max = -inf_value(A());
            for (int u = 0; u < UNROLL; ++u) {
                const long long j = j0 + (long long)u * group_size;
                if (j >= at.seg_end) continue;
                if (CACHE_ROW && !staged) row_cache[j - at.seg_begin] = v[u];
                for (int e = 0; e < VEC; ++e) {
                    const A y_ue = capped<P::softcap>(to_acc(v[u].v[e]), softcap);
                    if (P::softcap) y_kept[u % KEPT_U][e % KEPT_E] = y_ue;
                    step_max = nan_max(step_max, y_ue);
                }
            }
            rebase(state, step_max);
            if (SCE_LEAN_PASS1 && state.max != -inf_value(A())) {
                A part[UNROLL];
                for (int u = 0; u < UNROLL; ++u) {
                    const long long j = j0 + (long long)u * group_size;
                    part[u] = A(0);
                    if (j >= at.seg_end) continue;
                    const bool label_here = skip_label && j == label_chunk;
                    for (int e = 0; e < VEC; ++e) {
                        const A term = exp_shifted(y(u, e) - state.max);
                        part[u] += label_here && e == label_lane ? A(0) : term;
                    }
                }
                for (int width = 1; width < UNROLL; width *= 2) {  // pairwise, a fixed order
                    for (int u = 0; u + width < UNROLL; u += 2 * width) part[u] += part[u + width];
                }
                state.sum += part[0];
            } else if (state.max != -inf_value(A())) {  // all -inf so far: nothing to add
                for (int u = 0; u < UNROLL; ++u) {
                    const long long j = j0 + (long long)u * group_size;
                    if (j >= at.seg_end) continue;
                    for (int e = 0; e < VEC; ++e) {
                        // the label's term stays out of the sum (row_terms adds it back exactly)
                        if (!(skip_label && j * VEC + e == lab)) state.sum += exp_shifted(y(u, e) - state.max);
                    }
                }
            }
            if (P::state_mask & STATE_Y_SUM) {  // smoothing's sum_k (y_k - ref) (a -inf logit makes it -inf)
                for (int u = 0; u < UNROLL; ++u) {
                    if (j0 + (long long)u * group_size >= at.seg_end) continue;
                    for (int e = 0; e < VEC; ++e) state.y_sum += y(u, e) - y_ref;
                }
            }
            if (SCE_PREFETCH) {
                for (int u = 0; u < UNROLL; ++u) v[u] = next[u];
            } else {
                load_step(v, j0 + step);
            }
        }
    }
    if (P::state_mask & (STATE_LABEL_SUM | STATE_LABEL_WEIGHT)) {
        // soft labels: the gradient needs sum_k label_k, the weight sum_k label_k w_k, before
        // pass 2 writes its first element
        for (long long j = at.seg_begin + at.lane; j < at.seg_end; j += group_size) {
            for (int e = 0; e < VEC; ++e) {
                const A lk = (A)label[at.base + (j * VEC + e) * inner];
                state.label_sum += lk;
                // a class the target does not touch adds nothing, even with a NaN or inf weight
                if (P::weight && lk != A(0)) state.label_weight += lk * weight[j * VEC + e];
            }
        }
    }
    if ((P::state_mask & STATE_PICKED) && kind == LABEL_VALID) {
        // the lane that owns the label's chunk reads its logit (it alone writes it in pass 2)
        const long long label_chunk = lab / VEC;
        if (label_chunk >= at.seg_begin && label_chunk < at.seg_end &&
            (label_chunk - at.seg_begin) % group_size == at.lane) {
            state.picked = capped<P::softcap>(to_acc(x[at.base + lab * inner]), softcap);
        }
    }
    return state;
}

// Step 3: a row's scalars, the same in every thread of the row.
template <typename A> struct RowTerms {
    A shift, log_sum_exp;  // lse = shift + log_sum_exp, kept apart (see row_terms)
    A label_ce;            // hard labels: lse - y[label], without cancellation (see row_terms)
    A weight;              // the row weight w (1 without F_WEIGHT)
    A prob_scale;          // softmax_k is multiplied by sum_k t_k (+ 2 z lse) in the gradient
    A grad_scale;          // loss_grad * w
    A one_minus_eps, eps_over_k;  // the target: (1 - eps) * label + eps / K
    A label_excess;        // hard labels: (prob_scale - 1) + (1 - t_label) = 2 z lse + eps - eps / K
};

template <typename T, typename L, int OP, int F>
__device__ __forceinline__ RowTerms<typename Acc<T>::type> row_terms(
        const RowState<typename Acc<T>::type>& state, const typename Acc<T>::type* lse_in,
        const typename Acc<T>::type* loss_grad, const typename Acc<T>::type* weight,
        const typename Acc<T>::type* weight_sum, long long K, long long lab, int kind, const RowPlace& at,
        typename Acc<T>::type smoothing, typename Acc<T>::type z_loss) {
    typedef typename Acc<T>::type A;
    typedef Plan<L, OP, F> P;
    RowTerms<A> r;
    // lse = shift + log_sum_exp, kept apart: log_sum_exp + (shift - y_k) is exact where
    // lse - y_k would first round a large lse.  An all -inf row has shift 0 and lse -inf.
    if (P::lse_pass) {
        r.shift = state.max == -inf_value(A()) ? A(0) : state.max;
        r.log_sum_exp = log_acc(state.sum);
        r.label_ce = r.log_sum_exp + (r.shift - state.picked);
        if ((P::state_mask & STATE_PICKED) && kind == LABEL_VALID && state.max != -inf_value(A())) {
            // pass 1 left the label's term out of state.sum (the other classes, relative to max)
            const A label_rel = state.picked - state.max;  // <= 0
            const A total = state.sum + exp_acc(label_rel);
            r.log_sum_exp = log_acc(total);
            // lse - y[label] = log1p(sum_{k != label} exp(y_k - y[label])): exact for a confident
            // prediction, where log(total) + (max - y[label]) would round 1 + (a loss of 1e-8) to
            // 1.  A label more than exp_headroom below the lse would overflow the factor; its loss
            // is large and the max shift loses nothing there.  (shift and log_sum_exp stay relative
            // to the max: pass 2's exp((y - shift) - log_sum_exp) must not subtract two large
            // numbers, as a shift by a far-off label logit would.)
            r.label_ce = label_rel >= r.log_sum_exp - exp_headroom(A())
                             ? log1p_acc(state.sum * exp_acc(-label_rel))
                             : r.log_sum_exp + (r.shift - state.picked);
        }
    } else {
        r.shift = OP == OP_BACKWARD_LSE && at.active ? lse_in[at.row] : A(0);
        r.log_sum_exp = A(0);
        r.label_ce = A(0);
    }
    r.one_minus_eps = P::smooth ? A(1) - smoothing : A(1);
    r.eps_over_k = P::smooth ? smoothing / A(K) : A(0);
    // sum_k t_k: 1 for a hard label, (1 - eps) sum_k label_k + eps for a soft one
    const A target_sum = P::soft ? r.one_minus_eps * state.label_sum + (P::smooth ? smoothing : A(0)) : A(1);
    r.weight = A(1);
    if (P::weight) {
        // Paddle's weight_gather: w = sum_k t_k weight_k
        const A mean_part = P::smooth ? smoothing * (*weight_sum / A(K)) : A(0);
        if (P::soft) {
            r.weight = r.one_minus_eps * state.label_weight + mean_part;
        } else if (kind == LABEL_VALID && at.active) {
            r.weight = r.one_minus_eps * weight[lab] + mean_part;
        }
    }
    // d/dy_k [sum_j t_j (lse - y_j) + z lse^2] = softmax_k (sum_j t_j + 2 z lse) - t_k
    r.prob_scale = P::zloss ? target_sum + A(2) * z_loss * (r.shift + r.log_sum_exp) : target_sum;
    const A g = (loss_grad != nullptr && at.active) ? loss_grad[at.row] : A(1);
    r.grad_scale = P::weight ? g * r.weight : g;
    // formed apart, not as prob_scale - 1 (sum_k t_k is 1 for a hard label): see label_grad_term
    r.label_excess = (P::zloss ? A(2) * z_loss * (r.shift + r.log_sum_exp) : A(0)) +
                     (P::smooth ? smoothing - r.eps_over_k : A(0));
    return r;
}

// A hard label's own gradient term softmax * prob_scale - t (y: its capped logit), from
// softmax - 1 = expm1(y - lse) and
// not from softmax: in a confident row softmax is 1 - 1e-8, which is 1.0f, and softmax - 1 would
// be 0 (or a few float ulps of 1, many bf16 / float16 ulps of the result).
// softmax * s - t = (softmax - 1) s + (s - 1) + (1 - t).  y - lse is -label_ce where pass 1
// formed that without cancellation (log1p of the other classes); from a given lse it is as exact
// as that lse.
template <bool LSE_PASS, typename A>
__device__ __forceinline__ A label_grad_term(const RowTerms<A>& t, A y) {
    const A log_prob = LSE_PASS ? -t.label_ce : (y - t.shift) - t.log_sum_exp;
    return expm1_acc(log_prob) * t.prob_scale + t.label_excess;
}

// The row's loss from its cross-entropy term: w * (ce + z lse^2); 0 when ignored, NaN for an
// unchecked bad label.
template <int F, typename A>
__device__ __forceinline__ A finish_loss(A ce, const RowTerms<A>& t, int kind, A z_loss) {
    A loss = ce;
    if (F & F_ZLOSS) {
        const A lse = t.shift + t.log_sum_exp;
        loss += z_loss * lse * lse;
    }
    if (F & F_WEIGHT) loss *= t.weight;
    if (kind == LABEL_IGNORED) loss = A(0);
    if (kind == LABEL_BAD) loss = nan_value(A());  // only reached unchecked
    return loss;
}

// Step 4 (hard labels): ce = lse - y[label] (row_terms' label_ce); with smoothing
// (1 - eps) (lse - y[label]) + eps (lse - mean_k y_k), the mean from sum_k (y_k - ref) (pass 1).
template <typename T, typename L, int OP, int F>
__device__ __forceinline__ typename Acc<T>::type hard_loss(const RowState<typename Acc<T>::type>& state,
                                                          const RowTerms<typename Acc<T>::type>& t, const T* x_row,
                                                          long long K, int kind, typename Acc<T>::type smoothing,
                                                          typename Acc<T>::type z_loss, typename Acc<T>::type softcap) {
    typedef typename Acc<T>::type A;
    A ce = t.label_ce;
    if (F & F_SMOOTH) {
        const A y_ref = smoothing_reference<(F & F_SOFTCAP) != 0>(x_row, softcap);
        ce = t.one_minus_eps * ce + smoothing * (t.log_sum_exp + ((t.shift - y_ref) - state.y_sum / A(K)));
    }
    return finish_loss<F>(ce, t, kind, z_loss);
}

// Step 5 (pass 2): probabilities, the soft loss, the softmax and the gradient, element by element;
// returns this thread's part of the soft cross-entropy term.
template <typename T, typename L, int OP, int F, int VEC, bool CACHE_ROW>
__device__ __forceinline__ typename Acc<T>::type pass2_elements(
        const T* x, const L* label, const T* softmax_in, T* softmax_out, T* grad_out, long long K,
        long long inner, int group_size, const RowPlace& at, long long lab, int kind,
        const RowTerms<typename Acc<T>::type>& t, typename Acc<T>::type softcap, Vec<T, VEC>* row_cache,
        bool stage_out) {
    typedef typename Acc<T>::type A;
    typedef Plan<L, OP, F> P;
    constexpr int UNROLL = unroll<A, VEC, P::softcap, 2>();
    const A zero = A(0);
    A soft_ce = zero;
    if (!at.active) return soft_ce;
    const long long vec_stride = VEC * inner;
    const T* const src_row = (OP == OP_BACKWARD_SOFTMAX ? softmax_in : x) + at.base;
    // several global loads in flight when pass 2 re-reads the row; from the row cache one chunk
    // at a time (shared memory is near, and a wide unrolled body only costs registers)
    constexpr int UNROLL2 = CACHE_ROW ? 1 : UNROLL;
    for (long long j0 = at.seg_begin + at.lane; j0 < at.seg_end; j0 += (long long)group_size * UNROLL2) {
        Vec<T, VEC> v[UNROLL2];
        for (int u = 0; u < UNROLL2; ++u) {
            const long long j = j0 + (long long)u * group_size;
            // CACHE_ROW is only launched with pass 1 reading x, so the cache holds this chunk
            if (j < at.seg_end) v[u] = CACHE_ROW ? row_cache[j - at.seg_begin] : load_vec<T, VEC>(src_row + j * vec_stride);
        }
        for (int u = 0; u < UNROLL2; ++u) {
            const long long j = j0 + (long long)u * group_size;
            if (j >= at.seg_end) continue;
            Vec<T, VEC> sm, gr;
            for (int e = 0; e < VEC; ++e) {
                const long long k = j * VEC + e;
                const A y = OP == OP_BACKWARD_SOFTMAX ? zero : capped<P::softcap>(to_acc(v[u].v[e]), softcap);
                const A prob = OP == OP_BACKWARD_SOFTMAX ? to_acc(v[u].v[e]) : exp_shifted((y - t.shift) - t.log_sum_exp);
                if (P::softmax) sm.v[e] = from_acc<T>(prob);
                if (!P::soft && !P::grad) continue;
                // the target t_k, formed in A before any rounding to T (float16 softmax - 1 would cancel)
                A target;
                if (P::soft) {
                    const A lk = label[at.base + k * inner];
                    target = P::smooth ? t.one_minus_eps * lk + t.eps_over_k : lk;
                    // a zero target adds 0 even at y_k = -inf (0 * inf would be NaN)
                    if (P::loss && target != zero) soft_ce += target * (t.log_sum_exp + (t.shift - y));
                } else {
                    target = (k == lab ? t.one_minus_eps : zero) + t.eps_over_k;
                }
                if (!P::grad) continue;
                A grad;
                if (kind == LABEL_IGNORED) {
                    grad = zero;  // selected, not multiplied: the row's logits may be NaN or inf
                } else if (kind == LABEL_BAD) {
                    grad = nan_value(A());
                } else {
                    // d/dy_k loss = w (softmax_k (sum_j t_j + 2 z lse) - t_k); times dy_k/dx_k
                    // (the grad op's stored softmax is all it has: its label term is softmax - 1)
                    grad = (!P::soft && OP != OP_BACKWARD_SOFTMAX && k == lab ? label_grad_term<P::lse_pass>(t, y)
                                                                               : prob * t.prob_scale - target) *
                           t.grad_scale;
                    if (P::softcap) grad *= cap_slope<true>(to_acc(v[u].v[e]), softcap);
                }
                gr.v[e] = from_acc<T>(grad);
            }
            // in place (grad_out == x): this thread loaded chunk j above, before this store.
            // stage_out: the chunk goes back where it was read from, and rows() writes the block's rows
            if (stage_out) {
                if (P::softmax) row_cache[j - at.seg_begin] = sm;
                if (P::grad) row_cache[j - at.seg_begin] = gr;
            } else {
                if (P::softmax) store_vec<T, VEC>(softmax_out + at.base + j * vec_stride, sm);
                if (P::grad) store_vec<T, VEC>(grad_out + at.base + j * vec_stride, gr);
            }
        }
    }
    return soft_ce;
}

// The row cache's contents from global memory before pass 1: by the bulk copy engine under
// SCE_BULK_STAGE where both ends are 16-byte aligned (the tail of fewer than 16 bytes by the
// threads), else by the threads (block_copy).  The caller synchronizes the block afterwards.
// `slot`: 8 bytes of dynamic shared memory for the bulk copy's mbarrier (the warp partials' first
// slot: the reductions use it only after pass 1).
template <typename T>
__device__ __forceinline__ void stage_in(T* dst, const T* src, long long count, unsigned long long* slot) {
    if (SCE_BULK_STAGE && aligned_16(dst, src)) {
        const long long bulk = count * (long long)sizeof(T) / 16 * 16;
        bulk_copy_to_shared(dst, src, bulk, slot);
        const long long done = bulk / (long long)sizeof(T);
        block_copy(dst + done, src + done, count - done);  // under 16 bytes: element by element
    } else {
        block_copy(dst, src, count);
    }
}

// The body of both row kernels.  CLUSTER > 1 (cupy_sce_rows_cluster): a row is split over the
// CLUSTER CTAs of a thread block cluster (one row per cluster, group_size == blockDim.x), each
// CTA keeps its segment of the row in its shared memory (CACHE_ROW), and the CTAs merge their
// row states through distributed shared memory: one read of the row from global memory even
// when it is larger than one CTA's shared memory.
template <typename T, typename L, int OP, int F, int VEC, bool CACHE_ROW, int CLUSTER>
__device__ __forceinline__ void rows(SCE_ROWS_PARAMS) {
    typedef typename Acc<T>::type A;
    typedef Plan<L, OP, F> P;
    static_assert(!CACHE_ROW || (P::lse_pass && P::pass2), "the row cache serves pass 2 from pass 1's reads");
    const RowPlace at = place_thread<VEC, CLUSTER>(n_rows, K, inner, group_size);

    RowState<A>* const partials = sce_dynamic_smem<RowState<A> >();
    // the block's row cache (CACHE_ROW only; the host sized it, 16-byte aligned): each group's
    // segment in turn, chunk j of this group's at row_cache[j - seg_begin]
    T* const cache_rows =
        CACHE_ROW ? reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(partials) + state_area_bytes<A>()) : nullptr;
    Vec<T, VEC>* const row_cache =
        CACHE_ROW ? reinterpret_cast<Vec<T, VEC>*>(cache_rows) + (threadIdx.x / group_size) * at.seg_chunks : nullptr;

    // Staging (tuning knobs): the cache's rows -- the block's rows back to back, as they lie in x,
    // or a cluster CTA's segment of its row -- are read in one sweep before pass 1, which then
    // takes them from the cache (uniform over the block: it depends on the launch alone).
    // SCE_STAGE_ROWS stages one-thread rows, by the block's threads, and writes their softmax or
    // gradient back the same way (stage_out); SCE_BULK_STAGE stages every cached launch of
    // contiguous rows by the bulk copy engine.
    const bool stage_out = SCE_STAGE_ROWS && CACHE_ROW && CLUSTER == 1 && group_size == 1 && inner == 1;
    const bool staged = stage_out || (SCE_BULK_STAGE && CACHE_ROW && inner == 1);
    long long stage_first = 0, stage_count = 0;  // the elements of x staged: [first, first + count)
    if (staged && CLUSTER > 1) {
        stage_first = at.base + at.seg_begin * VEC;
        stage_count = (at.seg_end - at.seg_begin) * VEC;
    } else if (staged) {
        const long long rows_per_block = blockDim.x / group_size;
        const long long first_row = (long long)blockIdx.x * rows_per_block;
        stage_first = first_row * K;
        stage_count = (n_rows - first_row < rows_per_block ? n_rows - first_row : rows_per_block) * K;
    }
    if (staged) {
        stage_in(cache_rows, x + stage_first, stage_count, reinterpret_cast<unsigned long long*>(partials));
        __syncthreads();
    }

    // step 1: the label
    long long lab = -1;
    const int kind = at.active && P::labels ? hard_label(label, at.row, K, ignore_index, &lab) : LABEL_VALID;
    if (at.active && kind == LABEL_BAD && at.lane == 0) record_bad_row(bad_row, at.row);

    // step 2: pass 1, merged over the row's threads
    RowState<A> state = pass1_row_state<T, L, OP, F, VEC, CACHE_ROW>(x, label, weight, K, inner, group_size, at,
                                                                    lab, kind, softcap, row_cache, staged);
    if (P::state_mask != 0) {
        const MergeRowState<A, P::state_mask> merge;
        state = row_allreduce(state, merge, group_size, at.columns, partials);
        if (CLUSTER > 1) state = cluster_allreduce<CLUSTER>(state, merge, partials + SCE_STATE_SLOTS - 1);
    }

    // step 3: the row's scalars; step 4: its lse and (hard label) loss
    const RowTerms<A> t = row_terms<T, L, OP, F>(state, lse_in, loss_grad, weight, weight_sum, K, lab, kind, at,
                                                 smoothing, z_loss);
    if (at.active && at.lane == 0 && at.rank == 0) {
        if (P::lse_pass && lse_out != nullptr) lse_out[at.row] = t.shift + t.log_sum_exp;
        if (P::loss && !P::soft) {
            loss_out[at.row] = hard_loss<T, L, OP, F>(state, t, x + at.base, K, kind, smoothing, z_loss, softcap);
        }
    }

    // step 5: pass 2
    A soft_ce = A(0);
    if (P::pass2) {
        soft_ce = pass2_elements<T, L, OP, F, VEC, CACHE_ROW>(x, label, softmax_in, softmax_out, grad_out, K, inner,
                                                             group_size, at, lab, kind, t, softcap, row_cache,
                                                             stage_out);
    }
    if (stage_out && (P::softmax || P::grad)) {  // every row of the block is in the cache
        __syncthreads();
        block_copy((P::softmax ? softmax_out : grad_out) + stage_first, cache_rows, stage_count);
    }
    if (P::soft && P::loss) {  // uniform over the block: every thread joins
        soft_ce = row_allreduce(soft_ce, SumOp<A>(), group_size, at.columns, sce_dynamic_smem<A>());
        if (CLUSTER > 1) {
            soft_ce = cluster_allreduce<CLUSTER>(soft_ce, SumOp<A>(),
                                                 reinterpret_cast<A*>(partials + SCE_STATE_SLOTS - 1));
        }
        if (at.active && at.lane == 0 && at.rank == 0) loss_out[at.row] = finish_loss<F>(soft_ce, t, kind, z_loss);
    }
}

}  // namespace sce

template <typename T, typename L, int OP, int F, int VEC, bool CACHE_ROW>
__global__ void __launch_bounds__(SCE_MAX_BLOCK) cupy_sce_rows(SCE_ROWS_PARAMS) {
    sce::rows<T, L, OP, F, VEC, CACHE_ROW, 1>(SCE_ROWS_ARGS);
}

// ------------------------------------------------------------------------------------------
// cupy_sce_rows_cluster: cupy_sce_rows for rows whose cache does not fit one CTA's shared
// memory.  Arguments as above; grid = n_rows * CLUSTER blocks of group_size threads; dynamic
// shared memory SCE_STATE_SLOTS RowState<A> + ceil(K / VEC / CLUSTER) vectors (the host opts in
// above 48 KiB).  Always CACHE_ROW; pass 1 reads x (the forward ops with a pass 2).
// Needs sm_90 (thread block clusters); the host launches it only there.
// ------------------------------------------------------------------------------------------
template <typename T, typename L, int OP, int F, int VEC, int CLUSTER>
__global__ void __launch_bounds__(SCE_MAX_BLOCK) SCE_CLUSTER_DIMS(CLUSTER) cupy_sce_rows_cluster(SCE_ROWS_PARAMS) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    __trap();  // no clusters before sm_90 (compiled so that one module serves every device)
#else
    sce::rows<T, L, OP, F, VEC, true, CLUSTER>(SCE_ROWS_ARGS);
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
