// The interface between the virtual GPU's parts: the kernel library (kernels.cpp + engine.cpp,
// loaded once per concurrent block slot), the driver (driver.cpp, libcuda.so) and the cuBLAS
// stand-in (cublas.cpp, libcublas.so). Plain C types only: each library copy is dlopen'ed
// separately.
#pragma once

#include <cstddef>
#include <cstdint>

#define VK_MAX_PARAMS 24

struct VkKernel {
    const char* name;
    void (*run)(void** args);
    int params;
    std::size_t param_size[VK_MAX_PARAMS];
    bool param_is_pointer[VK_MAX_PARAMS];
    // Its __launch_bounds__ maximum of threads a block (1024 without one): a launch with more
    // fails, as on the hardware.
    int max_threads;
};

template <class... P>
constexpr std::size_t vk_arity(void (*)(P...)) { return sizeof...(P); }

// What the driver tells a kernel library copy: where device memory lives, and how to find the
// live allocation holding an address (for the memcheck).
struct VkHost {
    std::uintptr_t arena_lo, arena_hi;
    // 1 and the allocation's [lo, hi) when `addr` lies in a live allocation, else 0 and, in
    // `what`, a description of what is there (a freed allocation, the gap after one).
    int (*find)(std::uintptr_t addr, std::uintptr_t* lo, std::uintptr_t* hi, char* what, std::size_t what_len);
    // Incremented at every free, so that cached allocation bounds are re-checked.
    const std::uint64_t* generation;
    // The library file the copies came from (for addr2line: the copies are deleted once loaded).
    const char* library_path;
};

// The first error of a launch (memcheck, racecheck, a barrier deadlock), shared by its blocks.
struct VkReport {
    int errors;  // updated atomically
    char message[2048];
};

// The kernel library is compiled with -fvisibility=hidden, so the engine's callbacks (every load
// and store calls one) are direct calls rather than calls through the PLT; only the entry points
// that the driver and the tests look up by name are exported.
#define VK_EXPORT __attribute__((visibility("default")))

extern "C" {
// kernels.cpp
extern const VkKernel vk_kernel_table[];
extern const int vk_kernel_count;

// engine.cpp
typedef void (*VkConfigureFn)(const VkHost* host, int racecheck);
typedef const VkKernel* (*VkFindFn)(const char* name);
// Runs one block of `kernel` on the calling OS thread; returns the number of errors it found.
typedef int (*VkRunBlockFn)(const VkKernel* kernel, unsigned gx, unsigned gy, unsigned gz,
                            unsigned threads, unsigned bx, unsigned by, unsigned bz, void** args,
                            VkReport* report);
// The faulting CUDA thread's description ("kernel K block (x,y,z) thread (x,y,z)"), or 0 when the
// calling OS thread is not running a block of this library copy. For the driver's SIGSEGV handler.
typedef int (*VkWhereFn)(char* out, std::size_t len);
}
