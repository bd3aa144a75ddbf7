// libcublas.so for the virtual GPU: handles, streams, and the two products this crate calls
// (cublasSgemm_v2, cublasGemmEx), computed on the CPU in float64 from operands rounded as the
// tensor cores round them (TF32: 10 mantissa bits; bf16 operands are exact in float32).
// How cuBLAS rounds a float32 operand to TF32 is not documented (round to nearest, ties away,
// as cvt.rna.tf32.f32, or truncation), so INVASPREAD_VGPU_TF32 picks it: `nearest` (the
// default) or `truncate`, read at every product; the tests of TF32 GEMMs run under both. Column-major, as cuBLAS; queued on the handle's stream
// through the driver (vgpu_enqueue), with every operand's extent checked against its allocation.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cuda_types.h"

extern "C" int vgpu_check_range(CUdeviceptr addr, std::size_t bytes, char* why, std::size_t len);
extern "C" void vgpu_enqueue(CUstream stream, void (*run)(void*), void* closure);
extern "C" void vgpu_fail(const char* message);

namespace {

enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum : int { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum : int { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 };
enum : int { CUBLAS_TF32_TENSOR_OP_MATH = 3 };

struct Handle {
    CUstream stream = nullptr;
    int math_mode = 0;
    int pointer_mode = 0;  // host
};

enum Tf32Rounding { TF32_OFF, TF32_NEAREST, TF32_TRUNCATE };

float tf32(float x, Tf32Rounding mode) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;
    if (mode == TF32_NEAREST) u += 0x1000u;  // ties away from zero: the magnitude's half-ulp
    u &= ~0x1fffu;
    std::memcpy(&x, &u, 4);
    return x;
}

// The TF32 rounding of a product queued now (INVASPREAD_VGPU_TF32; an unknown value stops the
// process with its name, as every other misuse of the virtual GPU does).
Tf32Rounding tf32_rounding() {
    const char* v = std::getenv("INVASPREAD_VGPU_TF32");
    if (!v || !*v || std::strcmp(v, "nearest") == 0) return TF32_NEAREST;
    if (std::strcmp(v, "truncate") == 0) return TF32_TRUNCATE;
    const std::string message = std::string("INVASPREAD_VGPU_TF32=") + v + " is invalid: expected nearest or truncate";
    vgpu_fail(message.c_str());
    return TF32_NEAREST;
}

float from_bf16(std::uint16_t h) {
    const std::uint32_t u = std::uint32_t(h) << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

struct Product {
    int transa, transb, m, n, k, lda, ldb, ldc;
    double alpha, beta;
    const void* a;
    const void* b;
    float* c;
    int type;  // of A and B
    Tf32Rounding rounding;

    double element(const void* base, long index) const {
        if (type == CUDA_R_16BF) return from_bf16(static_cast<const std::uint16_t*>(base)[index]);
        const float x = static_cast<const float*>(base)[index];
        return rounding == TF32_OFF ? x : tf32(x, rounding);
    }

    void run() const {
        // op(A) packed column by column (m contiguous), so the inner loop streams.
        std::vector<double> ap((std::size_t)m * k);
        for (int l = 0; l < k; ++l)
            for (int i = 0; i < m; ++i)
                ap[(std::size_t)l * m + i] = element(a, transa == CUBLAS_OP_N ? (long)l * lda + i : (long)i * lda + l);
        auto columns = [&](int j0, int j1) {
            std::vector<double> acc(m);
            for (int j = j0; j < j1; ++j) {
                std::fill(acc.begin(), acc.end(), 0.0);
                for (int l = 0; l < k; ++l) {
                    const double blj = element(b, transb == CUBLAS_OP_N ? (long)j * ldb + l : (long)l * ldb + j);
                    const double* col = &ap[(std::size_t)l * m];
                    for (int i = 0; i < m; ++i) acc[i] += col[i] * blj;
                }
                float* out = c + (long)j * ldc;
                for (int i = 0; i < m; ++i)
                    out[i] = (float)(alpha * acc[i] + (beta == 0.0 ? 0.0 : beta * (double)out[i]));
            }
        };
        const int workers = (int)std::max(1u, std::min(8u, std::thread::hardware_concurrency()));
        if (workers == 1 || (double)m * n * k < 1e6) {
            columns(0, n);
            return;
        }
        std::vector<std::thread> pool;
        const int per = (n + workers - 1) / workers;
        for (int w = 0; w < workers; ++w) {
            const int j0 = w * per, j1 = std::min(n, j0 + per);
            if (j0 < j1) pool.emplace_back(columns, j0, j1);
        }
        for (auto& t : pool) t.join();
    }
};

int check_operand(const char* call, const char* name, const void* p, int rows, int cols, int ld, std::size_t elem) {
    if (rows == 0 || cols == 0) return CUBLAS_STATUS_SUCCESS;
    if (ld < rows) {
        std::fprintf(stderr, "invaspread virtual GPU: %s: ld%s = %d < %d rows\n", call, name, ld, rows);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    const std::size_t bytes = ((std::size_t)ld * (cols - 1) + rows) * elem;
    char why[512] = {};
    if (!vgpu_check_range(reinterpret_cast<CUdeviceptr>(p), bytes, why, sizeof why)) {
        std::string msg = std::string("memcheck: ") + call + " operand " + name + ": " + why;
        std::fprintf(stderr, "invaspread virtual GPU: %s\n", msg.c_str());
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    return CUBLAS_STATUS_SUCCESS;
}

int queue_product(Handle* h, const char* call, Product p) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (p.m < 0 || p.n < 0 || p.k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (p.m == 0 || p.n == 0) return CUBLAS_STATUS_SUCCESS;
    const std::size_t elem = p.type == CUDA_R_16BF ? 2 : 4;
    const bool na = p.transa == CUBLAS_OP_N, nb = p.transb == CUBLAS_OP_N;
    if (int s = check_operand(call, "A", p.a, na ? p.m : p.k, na ? p.k : p.m, p.lda, elem)) return s;
    if (int s = check_operand(call, "B", p.b, nb ? p.k : p.n, nb ? p.n : p.k, p.ldb, elem)) return s;
    if (int s = check_operand(call, "C", p.c, p.m, p.n, p.ldc, 4)) return s;
    auto* job = new Product(p);
    vgpu_enqueue(h->stream, [](void* j) {
        auto* product = static_cast<Product*>(j);
        product->run();
        delete product;
    }, job);
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

extern "C" {

int cublasCreate_v2(Handle** h) {
    *h = new Handle{};
    return CUBLAS_STATUS_SUCCESS;
}
int cublasDestroy_v2(Handle* h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSetStream_v2(Handle* h, CUstream s) {
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasGetStream_v2(Handle* h, CUstream* s) {
    *s = h->stream;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSetMathMode(Handle* h, int mode) {
    h->math_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasGetMathMode(Handle* h, int* mode) {
    *mode = h->math_mode;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSetPointerMode_v2(Handle* h, int mode) {
    if (mode != 0) return CUBLAS_STATUS_NOT_SUPPORTED;  // device pointer mode is not emulated
    h->pointer_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasGetPointerMode_v2(Handle* h, int* mode) {
    *mode = h->pointer_mode;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSetWorkspace_v2(Handle*, void*, std::size_t) { return CUBLAS_STATUS_SUCCESS; }

int cublasSgemm_v2(Handle* h, int transa, int transb, int m, int n, int k, const float* alpha, const float* a,
                   int lda, const float* b, int ldb, const float* beta, float* c, int ldc) {
    const bool tf = h && (h->math_mode & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH;
    return queue_product(h, "cublasSgemm", Product{transa, transb, m, n, k, lda, ldb, ldc, *alpha, *beta, a, b, c,
                                                   CUDA_R_32F, tf ? tf32_rounding() : TF32_OFF});
}

int cublasGemmEx(Handle* h, int transa, int transb, int m, int n, int k, const void* alpha, const void* a, int atype,
                 int lda, const void* b, int btype, int ldb, const void* beta, void* c, int ctype, int ldc,
                 int compute, int) {
    if (atype != btype || (atype != CUDA_R_32F && atype != CUDA_R_16BF) || ctype != CUDA_R_32F ||
        (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_TF32)) {
        std::fprintf(stderr,
                     "invaspread virtual GPU: cublasGemmEx with A %d, B %d, C %d, compute %d is not emulated "
                     "(float32 or bf16 operands into float32)\n",
                     atype, btype, ctype, compute);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    const bool tf = atype == CUDA_R_32F && (compute == CUBLAS_COMPUTE_32F_FAST_TF32 ||
                                            (h && (h->math_mode & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH));
    return queue_product(h, "cublasGemmEx",
                         Product{transa, transb, m, n, k, lda, ldb, ldc, *static_cast<const float*>(alpha),
                                 *static_cast<const float*>(beta), a, b, static_cast<float*>(c), atype,
                                 tf ? tf32_rounding() : TF32_OFF});
}

}  // extern "C"
