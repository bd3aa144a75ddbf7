// libcuda.so for the virtual GPU: the part of the CUDA driver API that cudarc calls for this
// crate, with kernels run by the kernel library (kernels.cpp + engine.cpp) on the CPU.
//
// - Device memory is one reserved arena of host address space; allocations are 256-byte aligned,
//   never reused (a freed range stays inaccessible, so a use after free is caught), separated by
//   a gap, and filled with 0xFF bytes (NaN as float) until written. Copies and memsets check
//   their ranges; kernels' accesses are checked by the engine against `find_allocation`.
// - Streams: each has a worker thread executing its queue in order, with a seeded random delay
//   before each operation (INVASPREAD_VGPU_SEED, 0 for none), so a missing wait shows up as wrong
//   data or a report. The null stream is the legacy default stream: it waits for, and is waited
//   for by, every blocking stream. Events are (stream, position) pairs; cuStreamWaitEvent queues
//   a wait on that position.
// - Launches: parameters are copied at the call by the kernel's own signature (VkKernel), pointer
//   parameters must point into live allocations, blocks run in a seeded shuffled order on up to
//   INVASPREAD_VGPU_BLOCKS (default 4) OS threads at once, each with its own copy of the kernel
//   library (its own `__shared__` statics).
// - Pinned host memory that an asynchronous copy is still writing (DtoH) is made inaccessible
//   until the host synchronises with that copy; a host access in between is reported (SIGSEGV
//   handler) as an unsynchronised read.
// - An error in a kernel or copy is sticky, as on the hardware: every later call returns it, and
//   cuGetErrorString gives the report.
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_types.h"
#include "vgpu.h"

namespace {

// ---- errors --------------------------------------------------------------------------------

std::atomic<int> sticky{CUDA_SUCCESS};
std::mutex sticky_lock;
std::string sticky_message;

void fail(CUresult code, const std::string& message, bool print = true) {
    if (print) std::fprintf(stderr, "invaspread virtual GPU: %s\n", message.c_str());
    std::lock_guard<std::mutex> g(sticky_lock);
    int expected = CUDA_SUCCESS;
    if (sticky.compare_exchange_strong(expected, code)) sticky_message = message;
}

std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

// A call-level error that is not sticky (a bad argument).
CUresult invalid(CUresult code, const std::string& message) {
    std::fprintf(stderr, "invaspread virtual GPU: %s\n", message.c_str());
    return code;
}

#define STICKY_CHECK                                                          \
    do {                                                                      \
        if (int s = sticky.load()) return static_cast<CUresult>(s);           \
    } while (0)

std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
    const char* v = std::getenv(name);
    return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

// ---- device memory -------------------------------------------------------------------------

constexpr std::size_t kArena = std::size_t(1) << 40;  // 1 TiB of address space, reserved only
constexpr std::size_t kAlign = 256, kGap = 4096;
char* arena = nullptr;
std::size_t arena_next = kGap;
std::uint64_t free_generation = 0;

struct Allocation {
    std::size_t size;
    bool live;
    bool carved;  // the crate cut it into pieces (vgpu_mark_piece): accesses are checked by piece
};
std::shared_mutex allocations_lock;
std::map<std::uintptr_t, Allocation> allocations;  // by base address
// Pieces of carved allocations (scratch that the crate lays out in one allocation, src/cuda/
// launch.rs `Carve`), by base address: an access must fall in one piece, so a kernel that runs
// past its piece is caught although it stays inside the allocation (the crate leaves a gap
// after each piece on the virtual GPU, so that a short overrun lands in no piece).
std::map<std::uintptr_t, std::size_t> pieces;
std::size_t bytes_live = 0;
constexpr std::size_t kTotalMemory = std::size_t(16) << 30;  // what the device reports

std::size_t page() { static const std::size_t p = (std::size_t)sysconf(_SC_PAGESIZE); return p; }

// The live allocation holding `addr` ([lo, hi) its bounds), or 0 with the reason in `what`. With
// `by_piece`, an address in a carved allocation must lie in one of its pieces, whose bounds are
// then returned (kernel accesses, copies, memsets); without it (pointer parameters: a pointer to
// an empty piece is valid), the allocation's.
int find_range(std::uintptr_t addr, std::uintptr_t* lo, std::uintptr_t* hi, char* what, std::size_t len,
               bool by_piece) {
    std::shared_lock<std::shared_mutex> g(allocations_lock);
    auto it = allocations.upper_bound(addr);
    if (it == allocations.begin()) {
        if (what) std::snprintf(what, len, "before the first allocation");
        return 0;
    }
    --it;
    const std::uintptr_t base = it->first, end = base + it->second.size;
    if (lo) *lo = base;
    if (hi) *hi = end;
    if (!it->second.live) {
        if (what) std::snprintf(what, len, "in the freed %zu-byte allocation at 0x%" PRIxPTR, it->second.size, base);
        return 0;
    }
    if (addr >= end) {
        if (what)
            std::snprintf(what, len, "%zu bytes past the end of the %zu-byte allocation at 0x%" PRIxPTR,
                          (std::size_t)(addr - end), it->second.size, base);
        return 0;
    }
    if (!by_piece || !it->second.carved) return 1;
    auto p = pieces.upper_bound(addr);
    if (p != pieces.begin()) {
        --p;
        if (p->first >= base && addr < p->first + p->second) {
            if (lo) *lo = p->first;
            if (hi) *hi = p->first + p->second;
            return 1;
        }
        if (p->first >= base) {
            if (lo) *lo = p->first;
            if (hi) *hi = p->first + p->second;
            if (what)
                std::snprintf(what, len,
                              "%zu bytes past the end of the %zu-byte piece at offset %zu of the %zu-byte carved "
                              "allocation at 0x%" PRIxPTR,
                              (std::size_t)(addr - p->first - p->second), p->second, (std::size_t)(p->first - base),
                              it->second.size, base);
            return 0;
        }
    }
    if (what)
        std::snprintf(what, len, "before the first piece of the %zu-byte carved allocation at 0x%" PRIxPTR,
                      it->second.size, base);
    return 0;
}

// For the engine: kernels' loads and stores, by piece.
int find_allocation(std::uintptr_t addr, std::uintptr_t* lo, std::uintptr_t* hi, char* what, std::size_t len) {
    return find_range(addr, lo, hi, what, len, true);
}

// Whether [addr, addr + bytes) lies in one live allocation; if not, says why. Copies, memsets
// and cuBLAS operands are checked by allocation, not by piece: zeroing a whole carved
// allocation, or one copy over several of its pieces, is legitimate.
bool range_ok(CUdeviceptr addr, std::size_t bytes, std::string* why) {
    if (bytes == 0) return true;
    std::uintptr_t lo = 0, hi = 0;
    char what[256] = {};
    if (find_range(addr, &lo, &hi, what, sizeof what, false) && addr + bytes <= hi) return true;
    if (what[0] == 0)
        std::snprintf(what, sizeof what, "runs %zu bytes past the end of the %zu-byte allocation at 0x%" PRIxPTR,
                      (std::size_t)(addr + bytes - hi), (std::size_t)(hi - lo), lo);
    *why = format("%zu bytes at 0x%llx: %s", bytes, (unsigned long long)addr, what);
    return false;
}

void arena_init() {
    void* p = mmap(nullptr, kArena, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("invaspread virtual GPU: reserving the device arena");
        std::abort();
    }
    arena = static_cast<char*>(p);
}

CUresult device_alloc(CUdeviceptr* out, std::size_t bytes, const char* call) {
    if (!out) return invalid(CUDA_ERROR_INVALID_VALUE, format("%s: null result pointer", call));
    if (bytes == 0)
        return invalid(CUDA_ERROR_INVALID_VALUE, format("%s of 0 bytes (the driver rejects empty allocations)", call));
    std::unique_lock<std::shared_mutex> g(allocations_lock);
    if (bytes_live + bytes > kTotalMemory)
        return invalid(CUDA_ERROR_OUT_OF_MEMORY, format("%s of %zu bytes: out of device memory", call, bytes));
    const std::size_t base = (arena_next + kAlign - 1) / kAlign * kAlign;
    const std::size_t pages_lo = base / page() * page();
    const std::size_t pages_hi = (base + bytes + page() - 1) / page() * page();
    if (pages_hi + kGap > kArena) return invalid(CUDA_ERROR_OUT_OF_MEMORY, format("%s: the arena is used up", call));
    if (mprotect(arena + pages_lo, pages_hi - pages_lo, PROT_READ | PROT_WRITE) != 0)
        return invalid(CUDA_ERROR_OUT_OF_MEMORY, format("%s: mprotect failed", call));
    std::memset(arena + base, 0xFF, bytes);  // NaN until written
    arena_next = base + bytes + kGap;
    const auto addr = reinterpret_cast<std::uintptr_t>(arena + base);
    allocations[addr] = Allocation{bytes, true, false};
    bytes_live += bytes;
    *out = addr;
    return CUDA_SUCCESS;
}

CUresult device_free(CUdeviceptr addr, const char* call) {
    std::unique_lock<std::shared_mutex> g(allocations_lock);
    auto it = allocations.find(addr);
    if (it == allocations.end() || !it->second.live)
        return invalid(CUDA_ERROR_INVALID_VALUE,
                       format("%s(0x%llx): not a live allocation%s", call, (unsigned long long)addr,
                              it == allocations.end() ? "" : " (freed twice)"));
    it->second.live = false;
    bytes_live -= it->second.size;
    pieces.erase(pieces.lower_bound(addr), pieces.lower_bound(addr + it->second.size));
    // Pages wholly inside the freed range become inaccessible (kernels' accesses to the rest
    // are caught by the engine through find_allocation).
    const std::size_t off = addr - reinterpret_cast<std::uintptr_t>(arena);
    const std::size_t lo = (off + page() - 1) / page() * page(), hi = (off + it->second.size) / page() * page();
    if (hi > lo) {
        madvise(arena + lo, hi - lo, MADV_DONTNEED);
        mprotect(arena + lo, hi - lo, PROT_NONE);
    }
    __atomic_fetch_add(&free_generation, 1, __ATOMIC_RELEASE);
    return CUDA_SUCCESS;
}

// ---- the kernel library copies (block slots) -----------------------------------------------

struct Slot {
    void* handle;
    VkFindFn find;
    VkRunBlockFn run_block;
    VkWhereFn where;
};
std::vector<Slot> slots;
std::mutex slots_lock;
std::condition_variable slots_cv;
std::vector<int> free_slots;
std::string kernel_library;

std::string library_dir() {
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&library_dir), &info);
    std::string self = info.dli_fname ? info.dli_fname : "";
    const auto slash = self.rfind('/');
    return slash == std::string::npos ? "." : self.substr(0, slash);
}

bool load_slots(std::string* why) {
    const char* override_lib = std::getenv("INVASPREAD_VGPU_KERNELS");
    kernel_library = override_lib && *override_lib ? override_lib : library_dir() + "/libvgpu_kernels.so";
    const int count = (int)std::max<std::uint64_t>(1, std::min<std::uint64_t>(16, env_u64("INVASPREAD_VGPU_BLOCKS", 4)));
    char dir_template[] = "/tmp/invaspread-vgpu-XXXXXX";
    const char* dir = mkdtemp(dir_template);
    if (!dir) {
        *why = "cannot make a temporary folder for the kernel library copies";
        return false;
    }
    static VkHost host;
    host.arena_lo = reinterpret_cast<std::uintptr_t>(arena);
    host.arena_hi = host.arena_lo + kArena;
    host.find = find_allocation;
    host.generation = &free_generation;
    host.library_path = kernel_library.c_str();
    const int racecheck = env_u64("INVASPREAD_VGPU_RACECHECK", 1) != 0;
    for (int i = 0; i < count; ++i) {
        // dlopen of one path gives one copy; each slot needs its own statics, so its own file.
        const std::string path = std::string(dir) + "/kernels-" + std::to_string(i) + ".so";
        const std::string cmd = "cp '" + kernel_library + "' '" + path + "'";
        if (std::system(cmd.c_str()) != 0) {
            *why = "cannot copy the kernel library " + kernel_library;
            return false;
        }
        void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        unlink(path.c_str());
        if (!h) {
            *why = std::string("cannot load the kernel library: ") + dlerror();
            return false;
        }
        Slot s{h, (VkFindFn)dlsym(h, "vk_find"), (VkRunBlockFn)dlsym(h, "vk_run_block"), (VkWhereFn)dlsym(h, "vk_where")};
        auto configure = (VkConfigureFn)dlsym(h, "vk_configure");
        if (!s.find || !s.run_block || !s.where || !configure) {
            *why = "the kernel library lacks its entry points";
            return false;
        }
        configure(&host, racecheck);
        slots.push_back(s);
        free_slots.push_back(i);
    }
    rmdir(dir);
    return true;
}

// ---- streams and events --------------------------------------------------------------------

struct Stream;
struct Op {
    std::function<void()> run;
    Stream* wait_for = nullptr;  // a cuStreamWaitEvent: block until that stream reaches...
    std::uint64_t wait_position = 0;  // ...this many completed operations
};

std::mutex progress_lock;
std::condition_variable progress_cv;  // any stream completed an operation

struct Stream {
    bool blocking;
    std::mutex lock;
    std::condition_variable cv;
    std::deque<Op> queue;
    std::uint64_t enqueued = 0;
    std::atomic<std::uint64_t> completed{0};
    bool stop = false;
    std::mt19937_64 delays;
    std::thread worker;

    explicit Stream(bool blocking_, std::uint64_t seed) : blocking(blocking_), delays(seed) {
        worker = std::thread([this] { work(); });
    }

    std::uint64_t push(Op op) {
        std::lock_guard<std::mutex> g(lock);
        queue.push_back(std::move(op));
        cv.notify_one();
        return ++enqueued;
    }

    void work() {
        const std::uint64_t max_delay_us = env_u64("INVASPREAD_VGPU_SEED", 1) ? 200 : 0;
        for (;;) {
            Op op;
            {
                std::unique_lock<std::mutex> g(lock);
                cv.wait(g, [&] { return stop || !queue.empty(); });
                if (queue.empty()) return;
                op = std::move(queue.front());
                queue.pop_front();
            }
            if (op.wait_for) {
                std::unique_lock<std::mutex> g(progress_lock);
                progress_cv.wait(g, [&] { return op.wait_for->completed.load() >= op.wait_position; });
            }
            if (max_delay_us) std::this_thread::sleep_for(std::chrono::microseconds(delays() % max_delay_us));
            if (op.run && sticky.load() == CUDA_SUCCESS) op.run();
            {
                std::lock_guard<std::mutex> g(progress_lock);
                completed.fetch_add(1);
            }
            progress_cv.notify_all();
        }
    }

    void wait_until(std::uint64_t position) {
        std::unique_lock<std::mutex> g(progress_lock);
        progress_cv.wait(g, [&] { return completed.load() >= position; });
    }
};

std::mutex streams_lock;
std::vector<Stream*> streams;  // [0] is the null stream
std::uint64_t seed = 1;

Stream* resolve(CUstream s) {
    if (s == nullptr || s == reinterpret_cast<CUstream>(0x1) || s == reinterpret_cast<CUstream>(0x2))
        return streams[0];
    auto* st = reinterpret_cast<Stream*>(s);
    {
        // A handle that is no live stream (a caller's stale or made-up value, such as a stream
        // handed in from another runtime) is an error here rather than a wild pointer: a real
        // driver may crash or answer CUDA_ERROR_INVALID_HANDLE.
        std::lock_guard<std::mutex> g(streams_lock);
        if (std::find(streams.begin(), streams.end(), st) != streams.end()) return st;
    }
    fail(CUDA_ERROR_INVALID_HANDLE, format("stream %p is not a live stream of the virtual GPU", static_cast<void*>(s)));
    return streams[0];
}

// Queues `run` on stream `s`, with the legacy default stream's implicit ordering.
std::uint64_t enqueue(CUstream handle, std::function<void()> run) {
    Stream* s = resolve(handle);
    std::vector<std::pair<Stream*, std::uint64_t>> deps;
    {
        std::lock_guard<std::mutex> g(streams_lock);
        if (s == streams[0]) {
            for (Stream* o : streams)
                if (o != s && o->blocking) deps.push_back({o, o->enqueued});
        } else if (s->blocking) {
            deps.push_back({streams[0], streams[0]->enqueued});
        }
    }
    for (auto& [o, pos] : deps)
        if (pos > o->completed.load()) s->push(Op{nullptr, o, pos});
    return s->push(Op{std::move(run)});
}

struct Event {
    Stream* stream = nullptr;
    std::uint64_t position = 0;
    // Shared with the queued record: an event may be destroyed before its record has run.
    std::shared_ptr<std::chrono::steady_clock::time_point> when;
    bool timing;
};

// ---- pinned host memory --------------------------------------------------------------------

struct Pinned {
    std::size_t size;
    // Pending asynchronous device-to-host copies into it: (stream, position).
    std::vector<std::pair<Stream*, std::uint64_t>> pending;
};
std::mutex pinned_lock;
std::map<std::uintptr_t, Pinned> pinned;

std::map<std::uintptr_t, Pinned>::iterator pinned_of(const void* p) {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    auto it = pinned.upper_bound(a);
    if (it == pinned.begin()) return pinned.end();
    --it;
    return a < it->first + it->second.size ? it : pinned.end();
}

std::size_t rounded(std::size_t n) { return (n + page() - 1) / page() * page(); }

// Makes pinned buffers whose pending copies have all completed accessible again (after the host
// synchronised with them).
void release_pinned() {
    std::lock_guard<std::mutex> g(pinned_lock);
    for (auto& [base, p] : pinned) {
        if (p.pending.empty()) continue;
        auto& v = p.pending;
        v.erase(std::remove_if(v.begin(), v.end(), [](auto& e) { return e.first->completed.load() >= e.second; }), v.end());
        if (v.empty()) mprotect(reinterpret_cast<void*>(base), rounded(p.size), PROT_READ | PROT_WRITE);
    }
}

struct sigaction previous_segv;

void on_segv(int sig, siginfo_t* info, void* uctx) {
    const auto addr = reinterpret_cast<std::uintptr_t>(info->si_addr);
    char where[256] = {};
    bool kernel_thread = false;
    for (auto& s : slots)
        if (s.where(where, sizeof where)) {
            kernel_thread = true;
            break;
        }
    const auto lo = reinterpret_cast<std::uintptr_t>(arena);
    if (kernel_thread && addr - lo < kArena) {
        // Already reported by the memcheck, which runs before each access: let the access land
        // on a scratch page so that the launch can finish and return its error.
        const std::uintptr_t pg = addr / page() * page();
        mprotect(reinterpret_cast<void*>(pg), page(), PROT_READ | PROT_WRITE);
        return;
    }
    for (auto& [base, p] : pinned)
        if (addr >= base && addr < base + rounded(p.size) && !p.pending.empty()) {
            char msg[512];
            const int n = std::snprintf(msg, sizeof msg,
                "invaspread virtual GPU: host access to pinned memory at 0x%" PRIxPTR
                " while an asynchronous device-to-host copy into it may still be running: synchronise "
                "the stream (or an event recorded after the copy) before reading it\n", addr);
            if (n > 0) (void)!write(2, msg, (std::size_t)n);
            _exit(86);
        }
    if (kernel_thread) {
        char msg[512];
        const int n = std::snprintf(msg, sizeof msg,
                                    "invaspread virtual GPU: memcheck: invalid access at 0x%" PRIxPTR
                                    " (not device memory) in %s\n", addr, where);
        if (n > 0) (void)!write(2, msg, (std::size_t)n);
        _exit(87);
    }
    // Not ours: the previous handler (Rust's stack-overflow guard) or the default action.
    if (previous_segv.sa_flags & SA_SIGINFO && previous_segv.sa_sigaction) {
        previous_segv.sa_sigaction(sig, info, uctx);
    } else if (previous_segv.sa_handler != SIG_DFL && previous_segv.sa_handler != SIG_IGN && previous_segv.sa_handler) {
        previous_segv.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
        raise(sig);
    }
}

// ---- initialisation ------------------------------------------------------------------------

std::once_flag init_once;
CUresult init_result = CUDA_SUCCESS;
int primary_context_marker;

void initialise() {
    seed = env_u64("INVASPREAD_VGPU_SEED", 1);
    arena_init();
    std::string why;
    if (!load_slots(&why)) {
        std::fprintf(stderr, "invaspread virtual GPU: %s\n", why.c_str());
        init_result = CUDA_ERROR_NOT_INITIALIZED;
        return;
    }
    streams.push_back(new Stream(true, seed));
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
}

// ---- launches ------------------------------------------------------------------------------

struct Module {
    int unused;
};
struct Function {
    const VkKernel* kernel;
    std::string name;
};

void run_launch(const Function& f, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                std::vector<std::vector<unsigned char>>& values, std::uint64_t launch_seed) {
    const VkKernel* k = f.kernel;
    for (int i = 0; i < k->params; ++i) {
        if (!k->param_is_pointer[i]) continue;
        std::uintptr_t p;
        std::memcpy(&p, values[i].data(), sizeof p);
        if (p == 0) continue;
        std::uintptr_t lo = 0, hi = 0;
        char what[256] = {};
        if (!find_range(p, &lo, &hi, what, sizeof what, false) && p != hi) {  // one past the end is a valid empty range
            fail(CUDA_ERROR_ILLEGAL_ADDRESS,
                 format("memcheck: kernel %s parameter %d is 0x%" PRIxPTR ", not in a live device allocation (%s)",
                        f.name.c_str(), i, p, what));
            return;
        }
    }
    std::vector<void*> args(k->params);
    for (int i = 0; i < k->params; ++i) args[i] = values[i].data();
    const std::uint64_t blocks = (std::uint64_t)gx * gy * gz;
    std::vector<std::uint64_t> order(blocks);
    for (std::uint64_t b = 0; b < blocks; ++b) order[b] = b;
    if (seed) std::shuffle(order.begin(), order.end(), std::mt19937_64(launch_seed));
    std::vector<int> mine;
    {
        std::unique_lock<std::mutex> g(slots_lock);
        slots_cv.wait(g, [] { return !free_slots.empty(); });
        while (!free_slots.empty() && mine.size() < blocks) {
            mine.push_back(free_slots.back());
            free_slots.pop_back();
        }
    }
    VkReport report{};
    std::atomic<std::uint64_t> next{0};
    auto worker = [&](int slot) {
        const VkKernel* local = slots[slot].find(f.name.c_str());
        for (std::uint64_t i; (i = next.fetch_add(1)) < blocks;) {
            const std::uint64_t b = order[i];
            slots[slot].run_block(local, gx, gy, gz, threads, (unsigned)(b % gx), (unsigned)(b / gx % gy),
                                  (unsigned)(b / gx / gy), args.data(), &report);
            if (__atomic_load_n(&report.errors, __ATOMIC_SEQ_CST)) break;
        }
    };
    std::vector<std::thread> pool;
    for (std::size_t i = 1; i < mine.size(); ++i) pool.emplace_back(worker, mine[i]);
    worker(mine[0]);
    for (auto& t : pool) t.join();
    {
        std::lock_guard<std::mutex> g(slots_lock);
        for (int s : mine) free_slots.push_back(s);
    }
    slots_cv.notify_all();
    if (report.errors) fail(CUDA_ERROR_ILLEGAL_ADDRESS, report.message, false);  // printed by the engine
}

CUresult copy(CUstream stream, bool async, void* dst_host, CUdeviceptr dst_dev, const void* src_host,
              CUdeviceptr src_dev, std::size_t bytes, const char* call) {
    STICKY_CHECK;
    std::string why;
    if (dst_dev && !range_ok(dst_dev, bytes, &why))
        return invalid(CUDA_ERROR_INVALID_VALUE, format("memcheck: %s destination: %s", call, why.c_str()));
    if (src_dev && !range_ok(src_dev, bytes, &why))
        return invalid(CUDA_ERROR_INVALID_VALUE, format("memcheck: %s source: %s", call, why.c_str()));
    if (bytes == 0) return CUDA_SUCCESS;
    void* dst = dst_host ? dst_host : reinterpret_cast<void*>(dst_dev);
    const void* src = src_host ? src_host : reinterpret_cast<const void*>(src_dev);
    bool dst_pinned = false;
    if (dst_host) {
        std::lock_guard<std::mutex> g(pinned_lock);
        dst_pinned = pinned_of(dst_host) != pinned.end();
    }
    std::shared_ptr<std::vector<unsigned char>> staged;
    if (src_host && async) {
        // The driver stages pageable (and, here, all) host sources at the call.
        staged = std::make_shared<std::vector<unsigned char>>((const unsigned char*)src, (const unsigned char*)src + bytes);
        src = staged->data();
    }
    const std::string what = call;
    auto run = [=] {
        // Queued while live, the memory may have been freed by the time the copy runs (a free on
        // another stream with no wait between): a use after free.
        std::string why_now;
        if ((dst_dev && !range_ok(dst_dev, bytes, &why_now)) || (src_dev && !range_ok(src_dev, bytes, &why_now))) {
            fail(CUDA_ERROR_ILLEGAL_ADDRESS, format("memcheck: %s ran after its memory was freed (it was live when queued): %s",
                                                    what.c_str(), why_now.c_str()));
            return;
        }
        if (dst_pinned) {
            std::lock_guard<std::mutex> g(pinned_lock);
            auto it = pinned_of(dst);
            mprotect(reinterpret_cast<void*>(it->first), rounded(it->second.size), PROT_READ | PROT_WRITE);
            std::memcpy(dst, src, bytes);
            if (!it->second.pending.empty()) mprotect(reinterpret_cast<void*>(it->first), rounded(it->second.size), PROT_NONE);
        } else {
            std::memcpy(dst, src, bytes);
        }
        (void)staged;
    };
    if (!async) {
        const std::uint64_t pos = enqueue(stream, run);
        resolve(stream)->wait_until(pos);
        release_pinned();
        STICKY_CHECK;
        return CUDA_SUCCESS;
    }
    if (dst_host && !dst_pinned) {
        // Into pageable memory the copy completes before the call returns (and so does the
        // work before it, whose error this call then reports).
        const std::uint64_t pos = enqueue(stream, run);
        resolve(stream)->wait_until(pos);
        STICKY_CHECK;
        return CUDA_SUCCESS;
    }
    if (dst_pinned) {
        std::lock_guard<std::mutex> g(pinned_lock);
        auto it = pinned_of(dst_host);
        Stream* s = resolve(stream);
        // Protected before the copy is queued (its position is filled in below), so that no
        // host access between the two is missed.
        it->second.pending.push_back({s, UINT64_MAX});
        mprotect(reinterpret_cast<void*>(it->first), rounded(it->second.size), PROT_NONE);
    }
    const std::uint64_t pos = enqueue(stream, run);
    if (dst_pinned) {
        std::lock_guard<std::mutex> g(pinned_lock);
        auto it = pinned_of(dst_host);
        for (auto& e : it->second.pending)
            if (e.first == resolve(stream) && e.second == UINT64_MAX) e.second = pos;
    }
    return CUDA_SUCCESS;
}

CUresult memset_bytes(CUdeviceptr dst, const void* pattern, std::size_t unit, std::size_t count, CUstream stream,
                      bool async, const char* call) {
    STICKY_CHECK;
    std::string why;
    if (!range_ok(dst, unit * count, &why))
        return invalid(CUDA_ERROR_INVALID_VALUE, format("memcheck: %s: %s", call, why.c_str()));
    unsigned char value[4];
    std::memcpy(value, pattern, unit);
    const std::string what = call;
    const std::uint64_t pos = enqueue(stream, [=] {
        std::string why_now;
        if (!range_ok(dst, unit * count, &why_now)) {
            fail(CUDA_ERROR_ILLEGAL_ADDRESS, format("memcheck: %s ran after its memory was freed (it was live when queued): %s",
                                                    what.c_str(), why_now.c_str()));
            return;
        }
        auto* p = reinterpret_cast<unsigned char*>(dst);
        for (std::size_t i = 0; i < count; ++i) std::memcpy(p + i * unit, value, unit);
    });
    if (!async) resolve(stream)->wait_until(pos);
    return CUDA_SUCCESS;
}

}  // namespace

// ---- for the cuBLAS stand-in ---------------------------------------------------------------

extern "C" int vgpu_check_range(CUdeviceptr addr, std::size_t bytes, char* why, std::size_t len) {
    std::string w;
    if (range_ok(addr, bytes, &w)) return 1;
    std::snprintf(why, len, "%s", w.c_str());
    return 0;
}

extern "C" void vgpu_enqueue(CUstream stream, void (*run)(void*), void* closure) {
    enqueue(stream, [run, closure] { run(closure); });
}

extern "C" void vgpu_fail(const char* message) { fail(CUDA_ERROR_ILLEGAL_ADDRESS, message); }

// ---- for the crate (src/cuda/virtual_gpu.rs), on the virtual GPU only ---------------------

// [addr, addr + bytes) is a piece that the crate carved from a live allocation; from now on
// accesses to that allocation are checked piece by piece. Marking the same piece again (every
// call lays its scratch out anew) changes nothing; a new layout replaces the pieces it overlaps.
// Returns 0, or 1 (with a message on stderr) when the range is not inside one live allocation.
extern "C" int vgpu_mark_piece(CUdeviceptr addr, std::size_t bytes) {
    if (bytes == 0) return 0;
    std::unique_lock<std::shared_mutex> g(allocations_lock);
    auto it = allocations.upper_bound(addr);
    if (it == allocations.begin() || !(--it)->second.live || addr + bytes > it->first + it->second.size) {
        std::fprintf(stderr, "invaspread virtual GPU: vgpu_mark_piece(0x%llx, %zu): not inside a live allocation\n",
                     (unsigned long long)addr, bytes);
        return 1;
    }
    auto same = pieces.find(addr);
    if (same != pieces.end() && same->second == bytes && it->second.carved) return 0;
    auto first = pieces.upper_bound(addr);
    if (first != pieces.begin() && std::prev(first)->first + std::prev(first)->second > addr) --first;
    pieces.erase(first, pieces.lower_bound(addr + bytes));
    pieces[addr] = bytes;
    it->second.carved = true;
    __atomic_fetch_add(&free_generation, 1, __ATOMIC_RELEASE);  // the engines' cached ranges
    return 0;
}

// ---- the driver API ------------------------------------------------------------------------

extern "C" {

CUresult cuInit(unsigned) {
    std::call_once(init_once, initialise);
    return init_result;
}

CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

// INVASPREAD_VGPU_DEVICES (1 to 16, default 1) devices, so that data-parallel ranks on one machine
// pick device LOCAL_RANK as on a real one. Every process has its own emulated device and memory;
// the ordinals of one process all name the same one (a rank uses one device).
static int device_count() {
    return (int)std::max<std::uint64_t>(1, std::min<std::uint64_t>(16, env_u64("INVASPREAD_VGPU_DEVICES", 1)));
}

CUresult cuDeviceGetCount(int* n) {
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = init_result == CUDA_SUCCESS ? device_count() : 0;
    return init_result;
}

CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, (std::size_t)len, "invaspread virtual GPU (CPU emulator, sm_90 limits)");
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *v = 1024; break;                    // max threads per block
        case 2: *v = 1024; break;
        case 3: *v = 1024; break;
        case 4: *v = 64; break;
        case 5: *v = 2147483647; break;              // grid x
        case 6: case 7: *v = 65535; break;
        case 8: *v = 48 * 1024; break;               // shared memory per block
        case 9: *v = 65536; break;
        case 10: *v = 32; break;                     // warp size
        case 12: *v = 65536; break;                  // registers per block
        case 13: *v = 1980000; break;
        case 16: *v = 132; break;                    // SMs
        case 36: *v = 3125000; break;                // memory clock, kHz (HBM3e, 4.8 TB/s)
        case 37: *v = 6144; break;                   // memory bus width, bits
        case 38: *v = 60 * 1024 * 1024; break;       // L2
        case 39: *v = 2048; break;
        case 41: *v = 1; break;                      // unified addressing
        case 75: *v = 9; break;                      // compute capability
        case 76: *v = 0; break;
        case 81: *v = 228 * 1024; break;
        case 82: *v = 65536; break;
        case 97: *v = 227 * 1024; break;             // opt-in shared memory per block
        case 106: *v = 32; break;
        case 115: *v = 1; break;                     // memory pools (cuMemAllocAsync)
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(std::size_t* bytes, CUdevice) {
    *bytes = kTotalMemory;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid(CUuuid* u, CUdevice) {
    std::memset(u, 0x42, sizeof *u);
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid_v2(CUuuid* u, CUdevice d) { return cuDeviceGetUuid(u, d); }

static CUdevice primary_device = 0;  // the ordinal whose primary context was retained last

CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    primary_device = d;
    *c = reinterpret_cast<CUcontext>(&primary_context_marker);
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRelease(CUdevice) { return CUDA_SUCCESS; }

thread_local CUcontext current_context = nullptr;
CUresult cuCtxSetCurrent(CUcontext c) {
    current_context = c;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = current_context;
    return CUDA_SUCCESS;
}
CUresult cuCtxPushCurrent_v2(CUcontext c) { return cuCtxSetCurrent(c); }
CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c) *c = current_context;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    *d = primary_device;
    return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize() {
    std::vector<std::pair<Stream*, std::uint64_t>> all;
    {
        std::lock_guard<std::mutex> g(streams_lock);
        for (Stream* s : streams) all.push_back({s, s->enqueued});
    }
    for (auto& [s, pos] : all) s->wait_until(pos);
    release_pinned();
    STICKY_CHECK;
    return CUDA_SUCCESS;
}

CUresult cuMemGetInfo_v2(std::size_t* free_bytes, std::size_t* total) {
    std::shared_lock<std::shared_mutex> g(allocations_lock);
    if (free_bytes) *free_bytes = kTotalMemory - bytes_live;
    if (total) *total = kTotalMemory;
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, std::size_t bytes) {
    STICKY_CHECK;
    return device_alloc(p, bytes, "cuMemAlloc");
}

CUresult cuMemAllocAsync(CUdeviceptr* p, std::size_t bytes, CUstream) {
    STICKY_CHECK;
    // A zero-byte request is refused as cuMemAlloc documents for itself (the driver's answer for
    // the stream-ordered call is undocumented; cudarc's `null()` counts on the null address).
    // invaspread makes no empty allocation, so every virtual-GPU run checks that it does not.
    return device_alloc(p, bytes, "cuMemAllocAsync");
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    if (p == 0) return CUDA_SUCCESS;
    // Like the driver, a free waits for the device to be done with the memory.
    cuCtxSynchronize();
    return device_free(p, "cuMemFree");
}

CUresult cuMemFreeAsync(CUdeviceptr p, CUstream stream) {
    if (p == 0) return CUDA_SUCCESS;  // the null slice
    {
        std::shared_lock<std::shared_mutex> g(allocations_lock);
        auto it = allocations.find(p);
        if (it == allocations.end() || !it->second.live)
            return invalid(CUDA_ERROR_INVALID_VALUE,
                           format("cuMemFreeAsync(0x%llx): not a live allocation", (unsigned long long)p));
    }
    // Stream-ordered: freed when the stream reaches this point.
    enqueue(stream, [p] { device_free(p, "cuMemFreeAsync"); });
    return CUDA_SUCCESS;
}

CUresult cuMemHostAlloc(void** p, std::size_t bytes, unsigned) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    void* m = mmap(nullptr, rounded(std::max<std::size_t>(bytes, 1)), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    std::lock_guard<std::mutex> g(pinned_lock);
    pinned[reinterpret_cast<std::uintptr_t>(m)] = Pinned{std::max<std::size_t>(bytes, 1), {}};
    *p = m;
    return CUDA_SUCCESS;
}
CUresult cuMemAllocHost_v2(void** p, std::size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }

CUresult cuMemFreeHost(void* p) {
    cuCtxSynchronize();
    std::lock_guard<std::mutex> g(pinned_lock);
    auto it = pinned.find(reinterpret_cast<std::uintptr_t>(p));
    if (it == pinned.end()) return invalid(CUDA_ERROR_INVALID_VALUE, "cuMemFreeHost of memory not from cuMemHostAlloc");
    munmap(p, rounded(it->second.size));
    pinned.erase(it);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, std::size_t n) {
    return copy(nullptr, false, nullptr, dst, src, 0, n, "cuMemcpyHtoD");
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, std::size_t n) {
    return copy(nullptr, false, dst, 0, nullptr, src, n, "cuMemcpyDtoH");
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, std::size_t n) {
    return copy(nullptr, false, nullptr, dst, nullptr, src, n, "cuMemcpyDtoD");
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, std::size_t n, CUstream s) {
    return copy(s, true, nullptr, dst, src, 0, n, "cuMemcpyHtoDAsync");
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, std::size_t n, CUstream s) {
    return copy(s, true, dst, 0, nullptr, src, n, "cuMemcpyDtoHAsync");
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, std::size_t n, CUstream s) {
    return copy(s, true, nullptr, dst, nullptr, src, n, "cuMemcpyDtoDAsync");
}

CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, std::size_t n) {
    return memset_bytes(d, &v, 1, n, nullptr, false, "cuMemsetD8");
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, std::size_t n, CUstream s) {
    return memset_bytes(d, &v, 1, n, s, true, "cuMemsetD8Async");
}
CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, std::size_t n) {
    return memset_bytes(d, &v, 4, n, nullptr, false, "cuMemsetD32");
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, std::size_t n, CUstream s) {
    return memset_bytes(d, &v, 4, n, s, true, "cuMemsetD32Async");
}

CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    STICKY_CHECK;
    if (!m || !image) return CUDA_ERROR_INVALID_VALUE;
    *m = reinterpret_cast<CUmodule>(new Module{0});
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule m) {
    delete reinterpret_cast<Module*>(m);
    return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    const VkKernel* k = slots.empty() ? nullptr : slots[0].find(name);
    if (!k) return invalid(CUDA_ERROR_NOT_FOUND, format("cuModuleGetFunction: no kernel named %s", name));
    *f = reinterpret_cast<CUfunction>(new Function{k, name});
    return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int attribute, CUfunction fn) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    // CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK (0): the kernel's __launch_bounds__, as the hardware
    // reports it; the others are 0.
    *v = attribute == 0 && fn ? reinterpret_cast<Function*>(fn)->kernel->max_threads : 0;
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction, int, int) { return CUDA_SUCCESS; }
CUresult cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }

CUresult cuLaunchKernel(CUfunction fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, CUstream stream, void** params, void** extra) {
    STICKY_CHECK;
    if (!fn) return CUDA_ERROR_INVALID_HANDLE;
    const Function& f = *reinterpret_cast<Function*>(fn);
    if (extra) return invalid(CUDA_ERROR_NOT_SUPPORTED, f.name + ": the `extra` launch parameters are not supported");
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535)
        return invalid(CUDA_ERROR_INVALID_VALUE, format("%s: grid (%u,%u,%u) is invalid", f.name.c_str(), gx, gy, gz));
    if (bx == 0 || bx * by * bz > 1024)
        return invalid(CUDA_ERROR_INVALID_VALUE, format("%s: block (%u,%u,%u) is invalid", f.name.c_str(), bx, by, bz));
    if ((int)(bx * by * bz) > f.kernel->max_threads)
        return invalid(CUDA_ERROR_INVALID_VALUE,
                       format("%s: a block of %u threads exceeds its __launch_bounds__ of %d", f.name.c_str(),
                              bx * by * bz, f.kernel->max_threads));
    if (by != 1 || bz != 1)
        return invalid(CUDA_ERROR_NOT_SUPPORTED, f.name + ": the virtual GPU runs one-dimensional blocks");
    if (shared != 0)
        return invalid(CUDA_ERROR_NOT_SUPPORTED, f.name + ": the virtual GPU has no dynamic shared memory");
    if (!params && f.kernel->params > 0) return invalid(CUDA_ERROR_INVALID_VALUE, f.name + ": no kernelParams");
    // Copied now: the caller may reuse its argument storage as soon as the call returns.
    std::vector<std::vector<unsigned char>> values(f.kernel->params);
    for (int i = 0; i < f.kernel->params; ++i) {
        const auto* p = static_cast<const unsigned char*>(params[i]);
        values[i].assign(p, p + f.kernel->param_size[i]);
    }
    static std::atomic<std::uint64_t> launches{0};
    const std::uint64_t launch_seed = seed * 0x9E3779B97F4A7C15ull + launches.fetch_add(1);
    auto shared_values = std::make_shared<std::vector<std::vector<unsigned char>>>(std::move(values));
    const Function* fp = &f;
    enqueue(stream, [=] { run_launch(*fp, gx, gy, gz, bx, *shared_values, launch_seed); });
    return CUDA_SUCCESS;
}

CUresult cuStreamCreate(CUstream* s, unsigned flags) {
    STICKY_CHECK;
    auto* st = new Stream((flags & 1) == 0, seed * 31 + streams.size());
    std::lock_guard<std::mutex> g(streams_lock);
    streams.push_back(st);
    *s = reinterpret_cast<CUstream>(st);
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int) { return cuStreamCreate(s, flags); }

CUresult cuStreamDestroy_v2(CUstream handle) {
    Stream* s = resolve(handle);
    if (s == streams[0]) return CUDA_ERROR_INVALID_HANDLE;
    // Work already queued still runs; the stream goes away after it (as the driver does).
    s->wait_until(s->enqueued);
    {
        std::lock_guard<std::mutex> g(streams_lock);
        streams.erase(std::remove(streams.begin(), streams.end(), s), streams.end());
    }
    {
        std::lock_guard<std::mutex> g(s->lock);
        s->stop = true;
    }
    s->cv.notify_all();
    s->worker.join();
    delete s;
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream handle) {
    Stream* s = resolve(handle);
    std::uint64_t pos;
    {
        std::lock_guard<std::mutex> g(s->lock);
        pos = s->enqueued;
    }
    s->wait_until(pos);
    release_pinned();
    STICKY_CHECK;
    return CUDA_SUCCESS;
}

CUresult cuStreamQuery(CUstream handle) {
    STICKY_CHECK;
    Stream* s = resolve(handle);
    std::lock_guard<std::mutex> g(s->lock);
    return s->completed.load() >= s->enqueued ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

CUresult cuEventCreate(CUevent* e, unsigned flags) {
    auto* ev = new Event{};
    ev->timing = (flags & 2) == 0;  // CU_EVENT_DISABLE_TIMING
    *e = reinterpret_cast<CUevent>(ev);
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent e) {
    delete reinterpret_cast<Event*>(e);
    return CUDA_SUCCESS;
}

CUresult cuEventRecord(CUevent e, CUstream handle) {
    STICKY_CHECK;
    auto* ev = reinterpret_cast<Event*>(e);
    Stream* s = resolve(handle);
    static std::mutex record_lock;  // one recorder at a time
    std::lock_guard<std::mutex> g(record_lock);
    auto when = std::make_shared<std::chrono::steady_clock::time_point>();
    ev->when = when;
    ev->position = enqueue(handle, [when] { *when = std::chrono::steady_clock::now(); });
    ev->stream = s;
    return CUDA_SUCCESS;
}
CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned) { return cuEventRecord(e, s); }

CUresult cuEventSynchronize(CUevent e) {
    auto* ev = reinterpret_cast<Event*>(e);
    if (ev->stream) ev->stream->wait_until(ev->position);
    release_pinned();
    STICKY_CHECK;
    return CUDA_SUCCESS;
}

CUresult cuEventQuery(CUevent e) {
    STICKY_CHECK;
    auto* ev = reinterpret_cast<Event*>(e);
    if (ev->stream && ev->stream->completed.load() < ev->position) return CUDA_ERROR_NOT_READY;
    release_pinned();
    return CUDA_SUCCESS;
}

CUresult cuStreamWaitEvent(CUstream handle, CUevent e, unsigned) {
    STICKY_CHECK;
    auto* ev = reinterpret_cast<Event*>(e);
    if (!ev->stream) return CUDA_SUCCESS;  // never recorded: no wait, as in CUDA
    resolve(handle)->push(Op{nullptr, ev->stream, ev->position});
    return CUDA_SUCCESS;
}

CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    auto* start = reinterpret_cast<Event*>(a);
    auto* stop = reinterpret_cast<Event*>(b);
    if (!start->timing || !stop->timing) return CUDA_ERROR_INVALID_HANDLE;
    if (!start->stream || !stop->stream) return CUDA_ERROR_INVALID_HANDLE;
    if (start->stream->completed.load() < start->position || stop->stream->completed.load() < stop->position)
        return CUDA_ERROR_NOT_READY;
    *ms = std::chrono::duration<float, std::milli>(*stop->when - *start->when).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuPointerGetAttribute(void* data, int attribute, CUdeviceptr p) {
    if (attribute == 2) {  // CU_POINTER_ATTRIBUTE_MEMORY_TYPE
        std::uintptr_t lo, hi;
        *static_cast<unsigned*>(data) = find_range(p, &lo, &hi, nullptr, 0, false) ? 2u : 1u;
        return CUDA_SUCCESS;
    }
    return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult cuGetErrorString(CUresult code, const char** out) {
    static thread_local std::string text;
    text = cuda_error_text(code);
    if (code == sticky.load()) {
        std::lock_guard<std::mutex> g(sticky_lock);
        text += " (virtual GPU: " + sticky_message + ")";
    }
    *out = text.c_str();
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult code, const char** out) {
    *out = cuda_error_name(code);
    return CUDA_SUCCESS;
}

}  // extern "C"
