// harness_main.cpp -- the fiber scheduler behind cuda_host_shim.h and the C entry point that
// cupy_sce/testing/harness.py calls through ctypes.
//
// Built as a shared library from: this file, the kernel source named by SCE_HARNESS_SOURCE and
// a generated registry.inc with one SCE_KERNEL(name<...>) line per template instantiation
// (cupy_sce._kernels.name_expressions, the backend's own list).
#include "cuda_host_shim.h"

#include SCE_HARNESS_SOURCE

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <utility>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SCE_ASAN 1
#endif

namespace sce_host {

thread_local uint3 block_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;

constexpr size_t kStackBytes = 256 * 1024;

struct FiberImpl : Fiber {
    ucontext_t ctx;
    char* stack;
    int block;            // index of its block in the running cluster
    bool done;
    const char* waiting;  // what the fiber is blocked on, for the deadlock report
};

struct WarpBarrier {
    unsigned mask;
    unsigned arrived;
    unsigned long long generation;
};

struct WarpState {
    std::vector<WarpBarrier> barriers;
    unsigned long long slots[kWarpSize];
    unsigned present;  // lanes that exist (the last warp of a block may be partial)
};

struct BlockState {
    uint3 idx;
    std::vector<WarpState> warps;
    int exited = 0;
    int bar_arrived = 0;
    unsigned long long bar_generation = 0;
    std::unique_ptr<unsigned char[]> smem;  // dynamic shared memory, exactly the launch's size
};

// One cluster (one block without clusters) being run: its blocks' threads are all fibers of it.
struct RunState {
    std::vector<BlockState> blocks;
    std::vector<FiberImpl> fibers;
    FiberImpl* current = nullptr;
    ucontext_t scheduler;
    int nthreads = 0;  // per block
    size_t shared_mem = 0;
    int cluster_arrived = 0;
    unsigned long long cluster_generation = 0;
    unsigned long long events = 0;  // arrivals, releases and exits: progress, for deadlock detection
    std::string error;
    void (*invoke)(void**) = nullptr;
    void** args = nullptr;
    const void* main_stack_bottom = nullptr;
    size_t main_stack_size = 0;
};

thread_local RunState* g_run = nullptr;
thread_local std::vector<std::unique_ptr<char[]>> g_stacks;  // reused; pages are touched lazily

Fiber& this_fiber() { return *g_run->current; }
static BlockState& current_block() { return g_run->blocks[g_run->current->block]; }
int lane_id() { return g_run->current->linear % kWarpSize; }
unsigned long long& warp_slot(int lane) { return current_block().warps[g_run->current->linear / kWarpSize].slots[lane]; }
unsigned char* dynamic_smem() { return current_block().smem.get(); }

static void yield_to_scheduler() {
    RunState& r = *g_run;
#ifdef SCE_ASAN
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, r.main_stack_bottom, r.main_stack_size);
#endif
    swapcontext(&r.current->ctx, &r.scheduler);
#ifdef SCE_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

static std::string where() {
    const FiberImpl& f = *g_run->current;
    char buf[160];
    std::snprintf(buf, sizeof buf, " [block (%u,%u,%u), thread (%u,%u,%u)]", block_idx.x, block_idx.y,
                  block_idx.z, f.thread_idx.x, f.thread_idx.y, f.thread_idx.z);
    return buf;
}

void fail(const std::string& message) {
    RunState& r = *g_run;
    if (r.error.empty()) r.error = message + where();
    for (;;) yield_to_scheduler();  // parked for good: the launch stops
}

void barrier_block() {
    BlockState& b = current_block();
    if (b.exited) fail("__syncthreads reached after " + std::to_string(b.exited) + " thread(s) of the block exited");
    const unsigned long long generation = b.bar_generation;
    ++g_run->events;
    if (++b.bar_arrived == g_run->nthreads) {
        b.bar_arrived = 0;
        ++b.bar_generation;
        return;
    }
    g_run->current->waiting = "__syncthreads";
    while (b.bar_generation == generation) yield_to_scheduler();
    g_run->current->waiting = nullptr;
}

void barrier_cluster() {
    RunState& r = *g_run;
    for (const auto& b : r.blocks) {
        if (b.exited) fail("cluster barrier reached after " + std::to_string(b.exited) + " thread(s) of a block exited");
    }
    const unsigned long long generation = r.cluster_generation;
    ++r.events;
    if (++r.cluster_arrived == r.nthreads * (int)r.blocks.size()) {
        r.cluster_arrived = 0;
        ++r.cluster_generation;
        return;
    }
    r.current->waiting = "cluster barrier";
    while (r.cluster_generation == generation) yield_to_scheduler();
    r.current->waiting = nullptr;
}

void* map_shared_rank(void* p, unsigned rank) {
    RunState& r = *g_run;
    if (rank >= r.blocks.size()) {
        fail("map_shared_rank: rank " + std::to_string(rank) + " in a cluster of " + std::to_string(r.blocks.size()));
    }
    const unsigned char* base = dynamic_smem();
    const unsigned char* q = static_cast<unsigned char*>(p);
    if (q < base || q >= base + r.shared_mem) fail("map_shared_rank: pointer outside this block's dynamic shared memory");
    return r.blocks[rank].smem.get() + (q - base);
}

static WarpBarrier* find_barrier(WarpState& w, unsigned mask) {
    for (auto& bar : w.barriers) if (bar.mask == mask) return &bar;
    return nullptr;
}

void barrier_warp(unsigned mask, const char* what) {
    RunState& r = *g_run;
    FiberImpl& f = *r.current;
    WarpState& w = current_block().warps[f.linear / kWarpSize];
    const int lane = f.linear % kWarpSize;
    if (mask & ~w.present) fail(std::string(what) + ": mask names lanes that do not exist in this warp");
    if (!(mask >> lane & 1u)) fail(std::string(what) + ": calling lane is not in the mask");
    WarpBarrier* bar = find_barrier(w, mask);
    if (bar == nullptr) {
        for (auto& other : w.barriers) {
            if (other.arrived && (other.mask & mask)) {
                fail(std::string(what) + ": lanes of one warp wait with overlapping, different masks");
            }
        }
        w.barriers.push_back(WarpBarrier{mask, 0u, 0ull});
        bar = &w.barriers.back();
    }
    const unsigned long long generation = bar->generation;
    ++r.events;
    bar->arrived |= 1u << lane;
    if (bar->arrived == mask) {
        bar->arrived = 0;
        ++bar->generation;
        return;
    }
    f.waiting = what;
    while (find_barrier(w, mask)->generation == generation) yield_to_scheduler();
    f.waiting = nullptr;
}

static void fiber_main() {
    RunState& r = *g_run;
#ifdef SCE_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &r.main_stack_bottom, &r.main_stack_size);
#endif
    r.invoke(r.args);
    r.current->done = true;
    ++r.blocks[r.current->block].exited;
    ++r.events;
#ifdef SCE_ASAN
    __sanitizer_start_switch_fiber(nullptr, r.main_stack_bottom, r.main_stack_size);
#endif
    // returning resumes uc_link: the scheduler
}

static void resume(RunState& r, FiberImpl& f) {
    r.current = &f;
    block_idx = r.blocks[f.block].idx;
#ifdef SCE_ASAN
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, f.stack, kStackBytes);
#endif
    swapcontext(&r.scheduler, &f.ctx);
#ifdef SCE_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, &r.main_stack_bottom, &r.main_stack_size);
#endif
}

// Runs every thread of r.blocks (the blocks of one cluster) to completion.
static bool run_cluster(RunState& r, std::mt19937_64& rng) {
    const int n = r.nthreads, n_blocks = (int)r.blocks.size(), total = n * n_blocks;
    const int warps_per_block = (n + kWarpSize - 1) / kWarpSize;
    for (auto& b : r.blocks) {
        b.warps.assign(warps_per_block, WarpState{});
        for (int w = 0; w < warps_per_block; ++w) {
            const int lanes = std::min(kWarpSize, n - w * kWarpSize);
            b.warps[w].present = lanes == kWarpSize ? 0xffffffffu : ((1u << lanes) - 1u);
        }
        b.exited = b.bar_arrived = 0;
    }
    r.fibers.assign(total, FiberImpl{});
    while ((int)g_stacks.size() < total) g_stacks.emplace_back(new char[kStackBytes]);
    for (int i = 0; i < total; ++i) {
        FiberImpl& f = r.fibers[i];
        const int t = i % n;
        f.linear = t;
        f.block = i / n;
        f.thread_idx = make_uint3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
        f.stack = g_stacks[i].get();
#ifdef SCE_ASAN
        ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);  // frames of fibers parked by an error
#endif
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = &r.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    // Warps are independent on a GPU: one can run far ahead of another between two barriers, in
    // its own block or in another block of the cluster.  So the scheduler picks warps (of all the
    // cluster's blocks) in a random order and runs each as far as it gets (until every lane waits
    // at a barrier or has exited); lanes within a warp are resumed in a random order too.  A
    // missing barrier then lets a warp read shared memory that another warp has not written yet
    // -- or overwrite it before that warp read it.
    const int n_warps = warps_per_block * n_blocks;
    std::vector<int> warp_order(n_warps);
    for (int w = 0; w < n_warps; ++w) warp_order[w] = w;
    std::vector<int> lanes;
    int live = total;
    while (live > 0) {
        const unsigned long long before = r.events;
        std::shuffle(warp_order.begin(), warp_order.end(), rng);
        for (int w : warp_order) {
            const int block = w / warps_per_block, first = (w % warps_per_block) * kWarpSize;
            const int last = std::min(n, first + kWarpSize);
            lanes.clear();
            for (int t = first; t < last; ++t) lanes.push_back(block * n + t);
            for (;;) {
                const unsigned long long warp_before = r.events;
                std::shuffle(lanes.begin(), lanes.end(), rng);
                for (int i : lanes) {
                    FiberImpl& f = r.fibers[i];
                    if (f.done) continue;
                    resume(r, f);
                    if (!r.error.empty()) return false;
                    if (f.done) --live;
                }
                if (r.events == warp_before) break;  // every lane waits on other warps, or is done
            }
        }
        if (live > 0 && r.events == before) {
            std::string report = "deadlock: no thread can make progress;";
            int shown = 0;
            for (const auto& f : r.fibers) {
                if (f.done || shown >= 4) continue;
                ++shown;
                report += " thread " + std::to_string(f.linear) + " of block " +
                          std::to_string(r.blocks[f.block].idx.x) + " waits at " + (f.waiting ? f.waiting : "?") + ";";
            }
            int exited = 0;
            for (const auto& b : r.blocks) exited += b.exited;
            report += " " + std::to_string(exited) + " thread(s) exited";
            char buf[64];
            std::snprintf(buf, sizeof buf, " [block (%u,%u,%u)]", r.blocks[0].idx.x, r.blocks[0].idx.y,
                          r.blocks[0].idx.z);
            r.error = report + buf;
            return false;
        }
    }
    return true;
}

// ---------------------------------------------------------------- kernel registry

struct Entry {
    const char* name;
    void (*invoke)(void**);
    int nargs;
    const size_t* arg_sizes;
};

template <typename F, F fn> struct Invoker;
template <typename... Args, void (*fn)(Args...)> struct Invoker<void (*)(Args...), fn> {
    static constexpr size_t sizes[sizeof...(Args) + 1] = {sizeof(Args)..., 0};
    template <size_t... I> static void call(void** args, std::index_sequence<I...>) {
        fn(*static_cast<Args*>(args[I])...);
    }
    static void invoke(void** args) { call(args, std::index_sequence_for<Args...>{}); }
    static Entry entry(const char* name) { return Entry{name, &invoke, (int)sizeof...(Args), sizes}; }
};

#define SCE_KERNEL(...) ::sce_host::Invoker<decltype(&__VA_ARGS__), &__VA_ARGS__>::entry(#__VA_ARGS__),

static const Entry kRegistry[] = {
#include "registry.inc"
};

}  // namespace sce_host

extern "C" {

int sce_harness_kernel_count() { return (int)(sizeof sce_host::kRegistry / sizeof sce_host::kRegistry[0]); }

const char* sce_harness_kernel_name(int i) { return sce_host::kRegistry[i].name; }

#ifdef SCE_STATE_SLOTS  // the library's kernels (not the harness self-test source)
// The layout constants the host computes shared memory from (_cupy_backend checks them in a test).
int sce_harness_state_bytes(int acc_bytes) {
    return acc_bytes == 8 ? (int)sizeof(sce::RowState<double>) : (int)sizeof(sce::RowState<float>);
}
int sce_harness_state_slots() { return SCE_STATE_SLOTS; }
int sce_harness_column_rows() { return SCE_COLUMN_ROWS; }
#endif

int sce_harness_is_asan() {
#ifdef SCE_ASAN
    return 1;
#else
    return 0;
#endif
}

// Launch `name` like cupy.RawKernel: args[i] points at the i-th argument's bytes (a pointer
// argument's bytes are the address), arg_sizes[i] is their size.  Returns 0, or 1 with a message.
// only_blocks (n_only > 0): run just these blockIdx.x values (with y = z = 0).
int sce_harness_launch(const char* name, const unsigned* grid, const unsigned* block, size_t shared_mem,
                       size_t max_shared, unsigned cluster, void** args, const size_t* arg_sizes, int nargs,
                       unsigned long long seed, const unsigned* only_blocks, size_t n_only, char* error,
                       size_t error_len) {
    using namespace sce_host;
    auto report = [&](const std::string& message) {
        std::snprintf(error, error_len, "%s: %s", name, message.c_str());
        return 1;
    };
    const Entry* entry = nullptr;
    for (const auto& e : kRegistry) if (std::strcmp(e.name, name) == 0) entry = &e;
    if (entry == nullptr) return report("no such kernel instantiation in the registry");
    if (nargs != entry->nargs) {
        return report("kernel takes " + std::to_string(entry->nargs) + " arguments, got " + std::to_string(nargs));
    }
    for (int i = 0; i < nargs; ++i) {
        if (arg_sizes[i] != entry->arg_sizes[i]) {
            return report("argument " + std::to_string(i) + " is " + std::to_string(arg_sizes[i]) +
                          " bytes but the kernel parameter takes " + std::to_string(entry->arg_sizes[i]));
        }
    }
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024) return report("block of " + std::to_string(threads) + " threads (1..1024)");
    if (block[2] > 64) return report("blockDim.z > 64");
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return report("empty grid");
    if (grid[0] > 2147483647u || grid[1] > 65535u || grid[2] > 65535u) return report("grid too large");
    if (max_shared > kMaxDynamicSmem) {
        return report("max_dynamic_shared_size_bytes " + std::to_string(max_shared) + " above the device's " +
                      std::to_string(kMaxDynamicSmem));
    }
    if (shared_mem > max_shared) {
        return report(std::to_string(shared_mem) + " bytes of dynamic shared memory, but the kernel allows " +
                      std::to_string(max_shared) + " (48 KiB without opt-in)");
    }
    if (cluster == 0 || cluster > kMaxCluster || grid[0] % cluster) {
        return report("cluster of " + std::to_string(cluster) + " blocks for a grid of " + std::to_string(grid[0]));
    }
    RunState r;
    r.nthreads = (int)threads;
    r.shared_mem = shared_mem;
    r.invoke = entry->invoke;
    r.args = args;
    r.blocks.resize(cluster);
    for (auto& b : r.blocks) b.smem.reset(new unsigned char[shared_mem]);
    block_dim = dim3(block[0], block[1], block[2]);
    grid_dim = dim3(grid[0], grid[1], grid[2]);
    g_run = &r;
    int status = 0;
    auto run_one = [&](unsigned first_x, unsigned y, unsigned z) {  // the cluster of blocks first_x, ...
        for (unsigned c = 0; c < cluster; ++c) {
            r.blocks[c].idx = make_uint3(first_x + c, y, z);
            std::memset(r.blocks[c].smem.get(), 0xff, shared_mem);  // unwritten shared memory reads as NaN
        }
        r.cluster_arrived = 0;
        r.error.clear();
        std::mt19937_64 rng(seed ^ (0x9e3779b97f4a7c15ull * (1 + first_x + 65536ull * (y + 65536ull * z))));
        if (!run_cluster(r, rng)) status = report(r.error);
    };
    if (n_only > 0) {
        for (size_t i = 0; i < n_only && !status; ++i) {
            if (only_blocks[i] >= grid[0]) status = report("requested block outside the grid");
            else run_one(only_blocks[i] - only_blocks[i] % cluster, 0, 0);
        }
    }
    for (unsigned z = 0; z < grid[2] && !status && n_only == 0; ++z) {
        for (unsigned y = 0; y < grid[1] && !status; ++y) {
            for (unsigned x = 0; x < grid[0] && !status; x += cluster) run_one(x, y, z);
        }
    }
    g_run = nullptr;
    return status;
}

}  // extern "C"
