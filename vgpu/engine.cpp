// The execution engine of a kernel library copy: fibers for the CUDA threads of a block, the
// barriers between them, and the memcheck and racecheck, which are the callbacks of GCC's
// -fsanitize=thread instrumentation of kernels.cpp (this file is not instrumented, and no TSan
// runtime is linked: the callbacks below are the whole runtime).
//
// - Fibers (ucontext): a block runs on the calling OS thread; each CUDA thread runs until it
//   reaches a barrier or exits, then the next runs. __syncthreads releases when every live
//   thread of the block has arrived; a warp exchange when every live lane of the warp has. An
//   exited thread no longer holds a barrier up (as on the hardware) and votes 0 in ballots. No
//   runnable thread while some still wait is a barrier divergence: reported, the block ends.
// - racecheck: every access to shared memory (the `emu_shared` section) is stamped per 4-byte
//   word with (block, barrier epoch, thread). A read of a word another thread wrote in the same
//   epoch, a write of a word another thread read or wrote in it, is a hazard (RAW, WAR, WAW):
//   reported every time, whatever the schedule, because epochs, not timing, decide. A read of a
//   word no thread of this block wrote is reported as uninitialised. Atomics are not checked.
// - memcheck: every access inside the device arena (VkHost) must fall in a live allocation; an
//   access elsewhere (stacks, the engine's own data) is not device memory and is not checked.
// Reports name the kernel, block, thread, address and, through addr2line, the source line.
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "emu.h"
#include "vgpu.h"

extern "C" char __start_emu_shared[];
extern "C" char __stop_emu_shared[];

namespace {

enum FiberState { RUNNABLE, AT_BLOCK, AT_WARP, DONE };

struct Fiber {
    void* sp = nullptr;  // saved stack pointer (x86-64 switch)
    ucontext_t context;  // elsewhere
    char* stack = nullptr;
    FiberState state = RUNNABLE;
    unsigned barriers = 0;  // __syncthreads passed: the racecheck's epoch within the block
    emu::ThreadState thread;
};

constexpr std::size_t kStack = 256 * 1024;  // reserved, committed on touch
constexpr unsigned kMaxThreads = 1024;

struct Block {
    const VkKernel* kernel = nullptr;
    void** args = nullptr;
    VkReport* report = nullptr;
    std::uint64_t serial = 0;  // this library copy's block counter
    unsigned threads = 0, live = 0, at_block = 0;
    unsigned warp_live[kMaxThreads / 32] = {}, at_warp[kMaxThreads / 32] = {};
    alignas(8) unsigned char slots[kMaxThreads / 32][32][emu::kSlotBytes] = {};
    void* scheduler_sp = nullptr;
    ucontext_t scheduler;
};

// One library copy runs one block at a time (the driver hands each copy to one OS thread), so
// the engine's state is plain globals of this copy; `current` marks the OS thread running it.
std::vector<Fiber> fibers(kMaxThreads);
Block block;
Fiber* current = nullptr;
// Set while run_block runs on `runner`. Plain globals, not thread_local: only the OS thread
// running a block executes this copy's kernel code, and TLS in a dlopen'ed library costs a
// __tls_get_addr call per access.
bool running_here = false;
pthread_t runner;

VkHost host{};
bool racecheck_on = true;

// Shadow of shared memory: per 4-byte word, the last write stamp and the last read stamp.
// stamp = epoch << 11 | thread << 1 | several_readers; epoch = block serial << 20 | barriers.
std::vector<std::uint64_t> shadow_write, shadow_read;
std::uint64_t next_serial = 1;

// The bounds of the allocations this copy's kernels touched since the last free anywhere (the
// fibers of a block share them). A kernel reads and writes several buffers in turn (x, w and
// col in im2col), so one cached range missed on nearly every access and each miss took the
// driver's allocation lock; a handful of ranges, scanned in order, hit almost always. A free
// bumps the generation and empties the cache, so an access to freed memory is still caught.
constexpr int kCachedRanges = 16;
struct Range {
    std::uintptr_t lo, hi;
};
Range cached[kCachedRanges] = {};
int cached_count = 0, cached_next = 0;
std::uint64_t cached_generation = ~0ull;

std::string source_line(const void* pc) {
    Dl_info info{};
    if (!pc || !dladdr(pc, &info) || !info.dli_fname) return "";
    if (host.library_path) info.dli_fname = host.library_path;
    const auto offset = reinterpret_cast<std::uintptr_t>(pc) -
                        reinterpret_cast<std::uintptr_t>(info.dli_fbase) - 1;
    char cmd[1024];
    std::snprintf(cmd, sizeof cmd, "addr2line -e '%s' -i 0x%" PRIxPTR " 2>/dev/null", info.dli_fname, offset);
    FILE* p = popen(cmd, "r");
    if (!p) return "";
    char line[512] = {};
    std::string out;
    while (std::fgets(line, sizeof line, p)) {
        std::string l(line);
        while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
        if (l.find("??") != std::string::npos) continue;
        if (!out.empty()) out += " inlined at ";
        const auto slash = l.rfind("/kernels/");
        out += slash == std::string::npos ? l : l.substr(slash + 1);
    }
    pclose(p);
    return out;
}

std::string where(const Fiber& f) {
    char buf[256];
    const auto& t = f.thread;
    std::snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)",
                  block.kernel ? block.kernel->name : "?", t.block_idx.x, t.block_idx.y,
                  t.block_idx.z, t.thread_idx.x, t.thread_idx.y, t.thread_idx.z);
    return buf;
}

// Records an error of the running launch; the first few also go to stderr at once.
void report(const std::string& what, const void* pc) {
    if (!block.report) return;
    const int n = __atomic_fetch_add(&block.report->errors, 1, __ATOMIC_SEQ_CST);
    if (n >= 4) return;
    std::string msg = what;
    const std::string line = source_line(pc);
    if (!line.empty()) msg += " at " + line;
    if (n == 0) std::snprintf(block.report->message, sizeof block.report->message, "%s", msg.c_str());
    std::fprintf(stderr, "invaspread virtual GPU: %s\n", msg.c_str());
}

// ---- fibers and barriers -------------------------------------------------------------------

#if defined(__x86_64__)
// A context switch without swapcontext's signal-mask system call (which made it the engine's
// main cost): saves the callee-saved registers on the current stack, stores the stack pointer in
// *save and continues on `load`. The floating-point control words are not switched: no kernel
// changes them, and all fibers of a block share the OS thread's.
extern "C" void emu_switch(void** save, void* load);
asm(R"(
.text
.globl emu_switch
.hidden emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");
constexpr bool kFastSwitch = true;
#else
constexpr bool kFastSwitch = false;
inline void emu_switch(void**, void*) {}
#endif

void yield_to_scheduler() {
    if (kFastSwitch) emu_switch(&current->sp, block.scheduler_sp);
    else swapcontext(&current->context, &block.scheduler);
}

void release_block_if_complete() {
    if (block.at_block == 0 || block.at_block != block.live) return;
    for (unsigned i = 0; i < block.threads; ++i)
        if (fibers[i].state == AT_BLOCK) {
            fibers[i].state = RUNNABLE;
            ++fibers[i].barriers;
        }
    block.at_block = 0;
}

void release_warp_if_complete(unsigned w) {
    if (block.at_warp[w] == 0 || block.at_warp[w] != block.warp_live[w]) return;
    const unsigned end = std::min(block.threads, (w + 1) * 32);
    for (unsigned i = w * 32; i < end; ++i)
        if (fibers[i].state == AT_WARP) fibers[i].state = RUNNABLE;
    block.at_warp[w] = 0;
}

void fiber_main() {
    Fiber* f = current;
    block.kernel->run(block.args);
    f->state = DONE;
    const unsigned w = f->thread.flat / 32;
    std::memset(block.slots[w][f->thread.flat % 32], 0, emu::kSlotBytes);
    --block.live;
    --block.warp_live[w];
    release_warp_if_complete(w);
    release_block_if_complete();
    if (kFastSwitch) emu_switch(&f->sp, block.scheduler_sp);  // never resumed
    // (ucontext) returns to block.scheduler through uc_link
}

// A fresh fiber's stack, laid out as emu_switch leaves a suspended one: six registers, then
// fiber_main as the return address (and a dummy return address above it, so
// that fiber_main starts with the stack alignment of a called function).
void* initial_stack(char* stack) {
    auto top = reinterpret_cast<std::uintptr_t>(stack + kStack) & ~std::uintptr_t(15);
    auto* sp = reinterpret_cast<std::uint64_t*>(top);
    *--sp = 0;  // fiber_main's return address: it never returns
    *--sp = reinterpret_cast<std::uint64_t>(&fiber_main);
    for (int r = 0; r < 6; ++r) *--sp = 0;
    return sp;
}

char* new_stack() {
    void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("invaspread virtual GPU: fiber stack");
        std::abort();
    }
    // A guard page at the bottom: an overflowing fiber faults instead of writing over
    // whatever mapping lies below (another thread's heap).
    mprotect(p, 4096, PROT_NONE);
    return static_cast<char*>(p);
}

void shadow_fit() {
    const std::size_t words = (std::size_t)(__stop_emu_shared - __start_emu_shared + 3) / 4;
    if (shadow_write.size() != words) {
        shadow_write.assign(words, 0);
        shadow_read.assign(words, 0);
    }
}

// ---- racecheck -----------------------------------------------------------------------------

constexpr std::uint64_t epoch_of(std::uint64_t stamp) { return stamp >> 11; }
constexpr unsigned thread_of(std::uint64_t stamp) { return (unsigned)(stamp >> 1) & 1023u; }

void check_shared(std::uintptr_t addr, std::size_t size, bool write, const void* pc) {
    const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(__start_emu_shared);
    const std::uint64_t epoch = block.serial << 20 | current->barriers;
    const unsigned me = current->thread.flat;
    const std::uint64_t mine = epoch << 11 | (std::uint64_t)me << 1;
    const std::size_t first = (addr - base) / 4, last = (addr + size - 1 - base) / 4;
    for (std::size_t w = first; w <= last && w < shadow_write.size(); ++w) {
        std::uint64_t& wr = shadow_write[w];
        std::uint64_t& rd = shadow_read[w];
        const char* hazard = nullptr;
        unsigned other = 0;
        if (write) {
            if (epoch_of(wr) == epoch && thread_of(wr) != me) {
                hazard = "write-after-write", other = thread_of(wr);
            } else if (epoch_of(rd) == epoch && (thread_of(rd) != me || (rd & 1))) {
                hazard = "write-after-read", other = thread_of(rd);
            }
            wr = mine;
        } else {
            if (epoch_of(wr) == epoch && thread_of(wr) != me) {
                hazard = "read-after-write", other = thread_of(wr);
            } else if (epoch_of(wr) >> 20 != block.serial) {
                hazard = "uninitialised read";
            }
            if (epoch_of(rd) != epoch) rd = mine;
            else if (thread_of(rd) != me) rd |= 1;
        }
        if (hazard) {
            char buf[512];
            const bool init = std::strcmp(hazard, "uninitialised read") == 0;
            if (init)
                std::snprintf(buf, sizeof buf,
                              "racecheck: uninitialised read of shared memory (%zu bytes at offset %zu, "
                              "never written by this block) in %s",
                              size, (std::size_t)(addr - base), where(*current).c_str());
            else
                std::snprintf(buf, sizeof buf,
                              "racecheck: %s hazard on shared memory (offset %zu) between thread %u and "
                              "thread %u with no __syncthreads between, in %s",
                              hazard, (std::size_t)(addr - base), other, me, where(*current).c_str());
            report(buf, pc);
            return;
        }
    }
}

// ---- memcheck ------------------------------------------------------------------------------

void check_global(std::uintptr_t addr, std::size_t size, bool write, const void* pc) {
    const std::uint64_t generation = __atomic_load_n(host.generation, __ATOMIC_ACQUIRE);
    if (generation == cached_generation) {
        for (int i = 0; i < cached_count; ++i)
            if (addr >= cached[i].lo && addr + size <= cached[i].hi) return;
    } else {
        cached_count = 0, cached_next = 0, cached_generation = generation;
    }
    std::uintptr_t lo = 0, hi = 0;
    char what[256] = {};
    if (host.find(addr, &lo, &hi, what, sizeof what) && addr + size <= hi) {
        cached[cached_next] = Range{lo, hi};
        cached_next = (cached_next + 1) % kCachedRanges;
        if (cached_count < kCachedRanges) ++cached_count;
        return;
    }
    if (what[0] == 0) std::snprintf(what, sizeof what, "%zu bytes past the end of [0x%" PRIxPTR ", 0x%" PRIxPTR ")",
                                    (std::size_t)(addr + size - hi), lo, hi);
    char buf[768];
    std::snprintf(buf, sizeof buf, "memcheck: invalid global %s of %zu bytes at 0x%" PRIxPTR " (%s) in %s",
                  write ? "write" : "read", size, addr, what, current ? where(*current).c_str() : "?");
    report(buf, pc);
}

inline void access(const void* p, std::size_t size, bool write, const void* pc) {
    if (!running_here || !current) return;
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    if (a - host.arena_lo < host.arena_hi - host.arena_lo) {
        check_global(a, size, write, pc);
    } else if (racecheck_on && a >= reinterpret_cast<std::uintptr_t>(__start_emu_shared) &&
               a < reinterpret_cast<std::uintptr_t>(__stop_emu_shared)) {
        check_shared(a, size, write, pc);
    }
}

// An atomic's access: bounds-checked when it is device memory, never racechecked.
inline void atomic_access(const volatile void* p, std::size_t size, const void* pc) {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    if (running_here && current && a - host.arena_lo < host.arena_hi - host.arena_lo)
        check_global(a, size, true, pc);
}

}  // namespace

// ---- the CUDA language's runtime (emu.h) ---------------------------------------------------

extern "C" emu::ThreadState* emu_thread() { return &current->thread; }

extern "C" void emu_sync_block() {
    current->state = AT_BLOCK;
    ++block.at_block;
    release_block_if_complete();
    yield_to_scheduler();
}

extern "C" void emu_sync_warp() {
    const unsigned w = current->thread.flat / 32;
    current->state = AT_WARP;
    ++block.at_warp[w];
    release_warp_if_complete(w);
    yield_to_scheduler();
}

extern "C" unsigned char (*emu_warp_slots())[emu::kSlotBytes] { return block.slots[current->thread.flat / 32]; }

// ---- warp-level matrix products (mma.sync), as kernels/mma.cuh's emulated side calls them ----
//
// Each lane deposits its A and B registers in its warp slot, the warp meets, and each lane
// reads the registers of the lanes that hold the row of A and the column of B its own D
// elements need, by the fragment layouts of the PTX ISA (section 9.7.14.5.8, "Matrix Fragments
// for mma.m16n8k8", .tf32; section 9.7.14.5.9, "Matrix Fragments for mma.m16n8k16 with
// floating point type", .bf16), with g = lane / 4 and t = lane % 4:
//   C, D (both shapes): d[q] is (row g + 8 (q / 2), column 2 t + q % 2).
//   m16n8k8 tf32:  a[r] is A(g + 8 (r % 2), t + 4 (r / 2)); b[r] is B(t + 4 r, g).
//   m16n8k16 bf16: a[r] holds A(g + 8 (r % 2), 2 t + 8 (r / 2) + h) in its half h (low half h = 0);
//                  b[r] holds B(2 t + 8 r + h, g) in its half h.
// Products of tf32 or bf16 values are exact in double, so the only rounding is the final one to
// float: the hardware's accumulation order is unspecified, and tolerances allow for it.
namespace {

struct MmaRegs {
    unsigned a[4], b[2];
};
static_assert(sizeof(MmaRegs) <= emu::kSlotBytes, "the slots hold one lane's operands");

// Deposits the lane's operands, meets the warp and copies out every lane's (the slots stay as
// they are until the closing meeting, which every lane passes before any writes again).
void mma_meet(const unsigned a[4], const unsigned b[2], MmaRegs all[32]) {
    const unsigned w = current->thread.flat / 32;
    if (block.warp_live[w] != 32) {
        char buf[96];
        std::snprintf(buf, sizeof buf, ": mma.sync with %u live lanes in its warp (it needs all 32)",
                      block.warp_live[w]);
        report(where(*current) + buf, nullptr);
    }
    MmaRegs mine;
    std::memcpy(mine.a, a, sizeof mine.a);
    std::memcpy(mine.b, b, sizeof mine.b);
    std::memcpy(block.slots[w][current->thread.flat % 32], &mine, sizeof mine);
    emu_sync_warp();
    for (unsigned l = 0; l < 32; ++l) std::memcpy(&all[l], block.slots[w][l], sizeof(MmaRegs));
}

double tf32_value(unsigned bits) {
    float f;
    bits &= 0xffffe000u;  // the format's 10 mantissa bits (the kernels round before, by rna)
    std::memcpy(&f, &bits, 4);
    return f;
}

double bf16_value(unsigned bits, unsigned half) {
    const unsigned u = ((bits >> (16 * half)) & 0xffffu) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// D = A B + C for this lane's four D elements, A(row, k) and B(k, col) read from every lane's
// registers by `a_at` and `b_at`.
template <class A, class B>
void mma_emulated(float d[4], const unsigned a[4], const unsigned b[2], unsigned k_len, A a_at, B b_at) {
    MmaRegs all[32];
    mma_meet(a, b, all);
    const unsigned lane = current->thread.flat % 32, g = lane / 4, t = lane % 4;
    float out[4];
    for (unsigned q = 0; q < 4; ++q) {
        const unsigned row = g + 8 * (q / 2), col = 2 * t + q % 2;
        double s = d[q];
        for (unsigned k = 0; k < k_len; ++k) s += a_at(all, row, k) * b_at(all, k, col);
        out[q] = (float)s;
    }
    emu_sync_warp();
    std::memcpy(d, out, sizeof out);
}

}  // namespace

extern "C" void emu_mma_tf32_m16n8k8(float d[4], const unsigned a[4], const unsigned b[2]) {
    // A(row, k): lane (row % 8) * 4 + k % 4, register row / 8 + 2 (k / 4).
    // B(k, col): lane col * 4 + k % 4, register k / 4.
    mma_emulated(
        d, a, b, 8,
        [](const MmaRegs* all, unsigned row, unsigned k) { return tf32_value(all[(row % 8) * 4 + k % 4].a[row / 8 + 2 * (k / 4)]); },
        [](const MmaRegs* all, unsigned k, unsigned col) { return tf32_value(all[col * 4 + k % 4].b[k / 4]); });
}

extern "C" void emu_mma_bf16_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2]) {
    // A(row, k): lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 (k / 8), half k % 2.
    // B(k, col): lane col * 4 + (k % 8) / 2, register k / 8, half k % 2.
    mma_emulated(
        d, a, b, 16,
        [](const MmaRegs* all, unsigned row, unsigned k) {
            return bf16_value(all[(row % 8) * 4 + (k % 8) / 2].a[row / 8 + 2 * (k / 8)], k % 2);
        },
        [](const MmaRegs* all, unsigned k, unsigned col) { return bf16_value(all[col * 4 + (k % 8) / 2].b[k / 8], k % 2); });
}

// ---- the library's entry points (vgpu.h) ---------------------------------------------------

extern "C" VK_EXPORT void vk_configure(const VkHost* h, int racecheck) {
    host = *h;
    racecheck_on = racecheck != 0;
}

extern "C" VK_EXPORT const VkKernel* vk_find(const char* name) {
    for (int i = 0; i < vk_kernel_count; ++i)
        if (std::strcmp(vk_kernel_table[i].name, name) == 0) return &vk_kernel_table[i];
    return nullptr;
}

extern "C" VK_EXPORT int vk_run_block(const VkKernel* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                            unsigned bx, unsigned by, unsigned bz, void** args, VkReport* report_to) {
    if (threads == 0 || threads > kMaxThreads) return 1;
    shadow_fit();
    const int errors_before = __atomic_load_n(&report_to->errors, __ATOMIC_SEQ_CST);
    block.kernel = kernel;
    block.args = args;
    block.report = report_to;
    block.serial = next_serial++;
    block.threads = threads;
    block.live = threads;
    block.at_block = 0;
    for (unsigned w = 0; w * 32 < threads; ++w) {
        block.warp_live[w] = std::min(32u, threads - w * 32);
        block.at_warp[w] = 0;
    }
    std::memset(block.slots, 0, sizeof block.slots);
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        if (!f.stack) f.stack = new_stack();
        f.state = RUNNABLE;
        f.barriers = 0;
        f.thread.grid_dim = dim3{gx, gy, gz};
        f.thread.block_dim = dim3{threads, 1, 1};
        f.thread.block_idx = dim3{bx, by, bz};
        f.thread.thread_idx = dim3{t, 0, 0};
        f.thread.flat = t;
        if (kFastSwitch) {
            f.sp = initial_stack(f.stack);
        } else {
            getcontext(&f.context);
            f.context.uc_stack.ss_sp = f.stack;
            f.context.uc_stack.ss_size = kStack;
            f.context.uc_link = &block.scheduler;
            makecontext(&f.context, fiber_main, 0);
        }
    }
    runner = pthread_self();
    running_here = true;
    unsigned done = 0;
    while (done < threads) {
        bool ran = false;
        for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].state != RUNNABLE) continue;
            current = &fibers[t];
            if (kFastSwitch) emu_switch(&block.scheduler_sp, fibers[t].sp);
            else swapcontext(&block.scheduler, &fibers[t].context);
            ran = true;
            if (fibers[t].state == DONE) ++done;
        }
        if (!ran && done < threads) {
            unsigned waiting = 0;
            for (unsigned t = 0; t < threads; ++t) waiting += fibers[t].state != DONE;
            char buf[256];
            std::snprintf(buf, sizeof buf,
                          "barrier divergence: %u threads of a block wait at a __syncthreads or warp "
                          "exchange that the others never reach, in %s",
                          waiting, where(fibers[0]).c_str());
            current = nullptr;
            report(buf, nullptr);
            break;  // the waiting fibers are abandoned; their stacks are reused
        }
    }
    current = nullptr;
    running_here = false;
    return __atomic_load_n(&report_to->errors, __ATOMIC_SEQ_CST) - errors_before;
}

extern "C" VK_EXPORT int vk_where(char* out, std::size_t len) {
    if (!running_here || !current || !pthread_equal(runner, pthread_self())) return 0;
    std::snprintf(out, len, "%s", where(*current).c_str());
    return 1;
}

// The tests' kernel emulator (tests/emulator): kernel `name` on a gx x gy grid of `threads`,
// blocks one after another on the calling thread, addresses in host memory (no memcheck; the
// racecheck runs). Returns 0, 1 for an unknown kernel, 2 when a check failed (on stderr).
extern "C" VK_EXPORT int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned threads, void** args) {
    const VkKernel* k = vk_find(name);
    if (!k) return 1;
    if ((int)threads > k->max_threads) return 3;  // beyond its __launch_bounds__, as the hardware
    // One block at a time in this library copy (its shared memory and engine state are global).
    static std::mutex serial;
    std::lock_guard<std::mutex> hold(serial);
    VkReport r{};
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) vk_run_block(k, gx, gy, 1, threads, bx, by, 0, args, &r);
    return r.errors ? 2 : 0;
}

// ---- the instrumentation's callbacks -------------------------------------------------------

#define PC __builtin_return_address(0)
#define ACCESS(n)                                                                               \
    extern "C" void __tsan_read##n(void* p) { access(p, n, false, PC); }                        \
    extern "C" void __tsan_write##n(void* p) { access(p, n, true, PC); }                        \
    extern "C" void __tsan_unaligned_read##n(void* p) { access(p, n, false, PC); }              \
    extern "C" void __tsan_unaligned_write##n(void* p) { access(p, n, true, PC); }              \
    extern "C" void __tsan_volatile_read##n(void* p) { access(p, n, false, PC); }               \
    extern "C" void __tsan_volatile_write##n(void* p) { access(p, n, true, PC); }
ACCESS(1)
ACCESS(2)
ACCESS(4)
ACCESS(8)
ACCESS(16)
extern "C" void __tsan_read_range(void* p, unsigned long n) { access(p, n, false, PC); }
extern "C" void __tsan_write_range(void* p, unsigned long n) { access(p, n, true, PC); }
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// Atomics (global memory ones are still bounds-checked; shared ones are not racechecked).
#define ATOMICS(bits, T)                                                                                         \
    extern "C" T __tsan_atomic##bits##_load(const volatile T* a, int) {                                          \
        atomic_access(a, sizeof(T), PC);                                                            \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                             \
    }                                                                                                            \
    extern "C" void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                                       \
        atomic_access(a, sizeof(T), PC);                                                             \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                \
    }                                                                                                            \
    extern "C" T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                                       \
        atomic_access(a, sizeof(T), PC);                                                             \
        return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                      \
    }                                                                                                            \
    extern "C" T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                                      \
        atomic_access(a, sizeof(T), PC);                                                                         \
        return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                       \
    }                                                                                                            \
    extern "C" T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }   \
    extern "C" T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {          \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
    }                                                                                                            \
    extern "C" int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {            \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
    }                                                                                                            \
    extern "C" T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
        return c;                                                                                                \
    }
ATOMICS(8, std::uint8_t)
ATOMICS(16, std::uint16_t)
ATOMICS(32, std::uint32_t)
ATOMICS(64, std::uint64_t)
