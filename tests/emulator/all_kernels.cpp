// Every kernel of kernels/ in one translation unit on the CUDA emulator (cuda_emu.h), behind one
// C entry point with the driver API's calling convention: emu_launch(name, grid, block, args),
// args[i] pointing at the i-th parameter's value. tests/emulated_kernels.rs builds this into a
// shared library with the system C++ compiler and calls it with the CPU reference's inputs.
#include "cuda_emu.h"

#include <functional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include "../../kernels/batchnorm.cu"
#include "../../kernels/conv_im2col.cu"
#include "../../kernels/elementwise.cu"
#include "../../kernels/instance_loss_fused_v1.cu"
#include "../../kernels/instance_loss_fused_v2.cu"
#include "../../kernels/instance_loss_unfused.cu"
#include "../../kernels/matmul.cu"
#include "../../kernels/normalize_rows.cu"
#include "../../kernels/pool.cu"
#include "../../kernels/reduce.cu"
#include "../../kernels/sgd.cu"
#include "../../kernels/topk.cu"

namespace {

template <class... P, std::size_t... I>
void invoke(void (*kernel)(P...), unsigned gx, unsigned gy, unsigned threads, void** args,
            std::index_sequence<I...>) {
    emu::launch(kernel, gx, gy, threads, *static_cast<std::remove_cv_t<P>*>(args[I])...);
}

using Entry = std::function<void(unsigned, unsigned, unsigned, void**)>;

template <class... P>
Entry entry(void (*kernel)(P...)) {
    return [kernel](unsigned gx, unsigned gy, unsigned threads, void** args) {
        invoke(kernel, gx, gy, threads, args, std::index_sequence_for<P...>{});
    };
}

}  // namespace

#define KERNEL(name) {#name, entry(&name)}

// Launches kernel `name` on a gx x gy grid of `threads`-thread blocks; returns 0, or 1 for an
// unknown kernel name.
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned threads, void** args) {
    static const std::unordered_map<std::string, Entry> table = {
        KERNEL(add_v1),
        KERNEL(avgpool_bwd_v1),
        KERNEL(avgpool_fwd_v1),
        KERNEL(axpy_v1),
        KERNEL(batchnorm_apply_v1),
        KERNEL(batchnorm_bwd_dx_v1),
        KERNEL(batchnorm_bwd_reduce_v1),
        KERNEL(batchnorm_eval_stats_v1),
        KERNEL(batchnorm_train_stats_v1),
        KERNEL(bcp_to_cbp_v1),
        KERNEL(bias_rows_v1),
        KERNEL(cbp_to_bcp_v1),
        KERNEL(col2im_v1),
        KERNEL(column_sums_v1),
        KERNEL(f32_to_bf16_v1),
        KERNEL(f64_to_f32_v1),
        KERNEL(im2col_v1),
        KERNEL(instance_loss_key_v1),
        KERNEL(instance_loss_key_v2),
        KERNEL(instance_loss_norms_v2),
        KERNEL(instance_loss_query_v1),
        KERNEL(instance_loss_query_v2),
        KERNEL(matmul_v1),
        KERNEL(normalize_rows_bwd_v1),
        KERNEL(normalize_rows_fwd_v1),
        KERNEL(relu_bwd_v1),
        KERNEL(relu_fwd_v1),
        KERNEL(row_mean_v1),
        KERNEL(sgd_multi_tensor_v1),
        KERNEL(topk_rows_v1),
        KERNEL(unfused_exp_v1),
        KERNEL(unfused_grad_matrix_v1),
        KERNEL(unfused_row_sums_v1),
        KERNEL(unfused_row_terms_v1),
    };
    const auto it = table.find(name);
    if (it == table.end()) return 1;
    it->second(gx, gy, threads, args);
    return 0;
}
