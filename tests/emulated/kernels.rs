//! Every CUDA kernel's own source, run on the CPU by the emulator in tests/emulator/ (each CUDA
//! thread a fiber of vgpu/engine.cpp, real barriers and warp exchanges), launched by the crate's
//! own launchers (`ops::<op>::cuda`, `loss::cuda`) through the `Queue` trait: the geometry and
//! argument lists under test are the ones a GPU run uses, written once. The results are
//! compared with the CPU implementations (`ops::<op>::cpu`: the bodies in
//! tests/common/op_cases.rs, which tests/gpu/nn.rs runs on a GPU too) and, for the loss, the
//! float64 reference, both gradient semantics. This checks the kernels' arithmetic, indexing, tail
//! masking and barrier use, and the launchers' sizes and arguments, on a machine without a
//! GPU; it is not a run on a GPU (timing, the driver, cuBLAS and hardware concurrency between
//! blocks are not exercised).
//!
//! The emulator is built with the system C++ compiler ($CXX, else g++); without one the tests
//! print `SKIPPED (no C++ compiler)` and pass.

use crate::emulator;

use invaspread::cuda::{Carve, DevPtr, DevPtrMut};
use invaspread::loss::cuda::ranks_v1::{
    enqueue_finish, enqueue_rows, enqueue_sum, OwnRows, RankScratch,
};
use invaspread::loss::cuda::{self as loss_cuda, CudaLossVersion, LossParams, Scratch};
use invaspread::loss::gathered::RankLayout;
use invaspread::loss::{reference, GradSemantics, LossConfig};
use invaspread::names::Named;
use invaspread::ops::{batchnorm, mma, Shape4};
use invaspread::testing::{adversarial_matrix, random_matrix, rng, scaled_grad_error};

use crate::common::op_cases;
use crate::emulator::{emulator, Emulator};
use clap::ValueEnum;
use invaspread::nn::EncoderKernels;

fn host(v: &[f32]) -> DevPtr<'_, f32> {
    DevPtr::host(v)
}
fn host_mut(v: &mut [f32]) -> DevPtrMut<'_, f32> {
    DevPtrMut::host(v)
}

// ---- the encoder's ops: one body each (tests/common/op_cases.rs), also run on a GPU --------

#[test]
fn conv_kernels_match_the_cpu_convolution() {
    let Some(e) = emulator("conv_kernels_match_the_cpu_convolution") else {
        return;
    };
    // (images, C_in, H, W, C_out, k, stride, pad): odd sizes, stride 2, 1x1, no padding.
    let cases = [
        (2, 3, 7, 5, 4, 3, 1, 1),
        (3, 2, 8, 8, 5, 3, 2, 1),
        (2, 4, 6, 6, 3, 1, 2, 0),
        (1, 2, 5, 5, 2, 3, 1, 0),
    ];
    op_cases::conv(e, &cases, 1e-5);
}

#[test]
fn batchnorm_kernels_match_the_cpu_batchnorm() {
    let Some(e) = emulator("batchnorm_kernels_match_the_cpu_batchnorm") else {
        return;
    };
    // v2 splits each channel's images into chunks: 3 of one image (3 x 4), 7 of 3 images with a
    // last of 2 (20 x 64), one chunk (1 x 2).
    let shapes = [(3, 4, 5, 3), (20, 64, 3, 2), (1, 2, 3, 3)];
    let xs = Shape4 {
        n: 20,
        c: 64,
        h: 3,
        w: 2,
    };
    assert_eq!(batchnorm::cuda::chunks(xs), (7, 3));
    op_cases::batchnorm(e, &shapes, 0.0, 1e-5);
}

#[test]
fn elementwise_pooling_and_linear_kernels_match_the_cpu() {
    let Some(e) = emulator("elementwise_pooling_and_linear_kernels_match_the_cpu") else {
        return;
    };
    op_cases::elementwise(e, 1000); // not a multiple of the block, several blocks of grid stride
    op_cases::pool(e);
    op_cases::linear(e, (5, 7, 300), (1e-6, 1e-5));
}

#[test]
fn multi_tensor_sgd_kernel_matches_the_cpu_update() {
    let Some(e) = emulator("multi_tensor_sgd_kernel_matches_the_cpu_update") else {
        return;
    };
    op_cases::sgd(e, &[1, 1023, 0, 1024, 1025, 40]);
}

#[test]
fn topk_kernel_matches_the_cpu_neighbour_search() {
    let Some(e) = emulator("topk_kernel_matches_the_cpu_neighbour_search") else {
        return;
    };
    op_cases::topk(e, (600, 3, 8), &[1, 2, 4, 50, 600], 1e-6);
}

#[test]
fn normalize_rows_kernels_match_the_cpu() {
    let Some(e) = emulator("normalize_rows_kernels_match_the_cpu") else {
        return;
    };
    op_cases::normalize_rows(e, (13, 37));
}

/// One loss version through `loss::cuda::enqueue`, its scratch carved from a host arena as
/// `CudaLoss` carves it from device memory.
fn emulated_loss(
    e: &Emulator,
    version: CudaLossVersion,
    z: &[f32],
    (n, d): (usize, usize),
    cfg: &LossConfig,
) -> (f64, Vec<f32>) {
    let bytes = Scratch::bytes(version, n, d).unwrap();
    let mut arena = vec![0u64; bytes.div_ceil(8) + 32]; // zeroed, as CudaLoss allocates it
    let words = arena.len() * 8;
    // SAFETY: reinterpreting the u64 arena as bytes (any bit pattern is a valid u8).
    let arena_bytes =
        unsafe { std::slice::from_raw_parts_mut(arena.as_mut_ptr() as *mut u8, words) };
    let mut carve = Carve::from(DevPtrMut::host(arena_bytes));
    let mut scratch = Scratch::carve(&mut carve, version, n, d).unwrap();
    let mut dz = vec![f32::NAN; n * d];
    let mut loss = [f64::NAN];
    loss_cuda::enqueue(
        e,
        version,
        host(z),
        Some(host_mut(&mut dz)),
        (n, d),
        cfg,
        &mut scratch,
        DevPtrMut::host(&mut loss),
    )
    .unwrap();
    (loss[0], dz)
}

#[test]
fn loss_kernels_match_the_float64_reference() {
    let Some(e) = emulator("loss_kernels_match_the_float64_reference") else {
        return;
    };
    // Sizes around fused v2's and v3's 64-row tiles, 32-column (v3 bf16: 64) chunks and
    // 128-column sweeps (N = 130, d = 130: three row blocks, a masked tail, two sweeps), random
    // and adversarial inputs.
    // The one-block-per-row versions (unfused, v1) run fewer cases: the emulator runs N blocks
    // of 256 fibers each, and v1 synchronises often (a fiber switch at every barrier).
    // Above the small sizes, the tiled versions only (fused-v2 and later).
    let versions = |n: usize, adversarial: bool| -> Vec<CudaLossVersion> {
        let all = CudaLossVersion::all();
        if n <= 6 || (n <= 70 && !adversarial) {
            all.collect()
        } else {
            all.skip_while(|&v| v != CudaLossVersion::FusedV2).collect()
        }
    };
    let mut i = 0u64;
    for (n, d) in [(6usize, 3usize), (70, 33), (130, 130)] {
        for adversarial in [false, true] {
            let z = if adversarial {
                adversarial_matrix(&mut rng(900 + i), n, d)
            } else {
                random_matrix(&mut rng(900 + i), n, d)
            };
            for semantics in [GradSemantics::QueryOnly, GradSemantics::BothSides] {
                let cfg = LossConfig {
                    tau: [0.1, 0.05, 0.5][i as usize % 3],
                    mu: [1.0, 2.0][i as usize % 2],
                    semantics,
                    ..LossConfig::default()
                };
                let want = reference::instance_loss(&z, n, d, &cfg, true).unwrap();
                for version in versions(n, adversarial) {
                    let tolerance = version.tolerance(cfg.tau, d, adversarial);
                    let (tol, grad_tol) = (tolerance.loss, tolerance.grad);
                    let (loss, dz) = emulated_loss(e, version, &z, (n, d), &cfg);
                    let case = format!(
                        "{} N={n} d={d} adversarial={adversarial} {cfg:?}",
                        version.name()
                    );
                    let rel = (loss - want.loss).abs() / want.loss.abs();
                    assert!(
                        rel < tol,
                        "{case}: loss {loss} vs {} (rel {rel:e})",
                        want.loss
                    );
                    let g: Vec<f64> = dz.iter().map(|&x| f64::from(x)).collect();
                    assert!(g.iter().all(|x| x.is_finite()), "{case}: not finite");
                    if let Some(grad_tol) = grad_tol {
                        let err = scaled_grad_error(&g, want.grad_z.as_ref().unwrap(), &z, d);
                        assert!(err < grad_tol, "{case}: gradient error {err:e}");
                    }
                }
                i += 1;
            }
        }
    }
}

#[test]
fn the_kernel_table_is_read_from_the_sources() {
    let names = emulator::kernel_names(
        "extern \"C\" __global__ void __launch_bounds__(256, 1)\nfoo_v1(int n) {}\n\
         extern \"C\" __global__ void bar_v2(float* x) {}",
    );
    assert_eq!(names, ["foo_v1", "bar_v2"]);
}

/// The kernel versions the tests above run: a new version (or a new op) fails this until its
/// op's body in tests/common/op_cases.rs runs it too (and then joins `OPS_UNDER_TEST`).
#[test]
fn every_kernel_version_is_under_test() {
    let registered: Vec<(&str, Vec<String>)> = EncoderKernels::versions();
    let tested: Vec<(&str, Vec<String>)> = op_cases::OPS_UNDER_TEST
        .iter()
        .map(|(op, vs)| (*op, vs.iter().map(|v| v.to_string()).collect()))
        .collect();
    assert_eq!(registered, tested, "encoder ops and versions under test");
    // The loss test above runs CudaLossVersion::all(), the loss registry's CUDA rows; every
    // version must have one.
    assert_eq!(
        CudaLossVersion::all().collect::<Vec<_>>(),
        CudaLossVersion::value_variants()
    );
}

/// The tensor-core products alone: every lane's registers placed by the PTX ISA's fragment
/// tables (`ops::mma`, written from the ISA apart from the emulator), D compared exactly.
#[test]
fn mma_fragment_layouts() {
    let Some(e) = emulator("mma_fragment_layouts") else {
        return;
    };
    for shape in mma::Shape::ALL {
        for seed in 0..4 {
            let p = mma::Probe::random(shape, 40 + seed);
            let mut d = vec![f32::NAN; p.expected_d.len()];
            mma::cuda::probe(
                e,
                shape,
                DevPtr::host(&p.a_regs),
                DevPtr::host(&p.b_regs),
                host(&p.c),
                host_mut(&mut d),
            )
            .unwrap();
            assert_eq!(d, p.expected_d, "{shape:?} seed {seed}");
        }
    }
}

// ---- the data-parallel loss rows (loss::cuda::ranks_v1) ------------------------------------
// Every rank of a group in this one process, the collectives done on the host (the
// reduce-scatter of the key side, the all-gather of the shares): the ranks together must give
// one device's float64 loss and each rank its rows of dL/dz.

/// A zeroed host arena of `bytes`, aligned for every scratch piece.
fn arena(bytes: usize) -> Vec<u64> {
    vec![0u64; bytes.div_ceil(8) + 32]
}

fn carve_of(arena: &mut [u64]) -> Carve<'_> {
    let words = arena.len() * 8;
    // SAFETY: reinterpreting the u64 arena as bytes (any bit pattern is a valid u8).
    let bytes = unsafe { std::slice::from_raw_parts_mut(arena.as_mut_ptr() as *mut u8, words) };
    Carve::from(DevPtrMut::host(bytes))
}

/// Every rank's loss and rows of dL/dz for the global batch `global` (one device's layout),
/// `ranks` ranks of m images each.
fn ranks_on_the_emulator(
    e: &Emulator,
    global: &[f32],
    (ranks, m, d): (usize, usize, usize),
    cfg: &LossConfig,
) -> (f64, Vec<Vec<f32>>) {
    let n = 2 * ranks * m;
    let layout = RankLayout::new(&vec![m; ranks]).unwrap();
    let p = LossParams::new(n, d, cfg, true).unwrap();
    let both_sides = cfg.semantics == GradSemantics::BothSides;
    let own: Vec<OwnRows> = (0..ranks)
        .map(|r| OwnRows::new(r, ranks, m).unwrap())
        .collect();
    let z: Vec<Vec<f32>> = (0..ranks)
        .map(|r| layout.take_rank_rows(global, d, r))
        .collect();
    let mut arenas: Vec<Vec<u64>> = own
        .iter()
        .map(|&o| arena(RankScratch::bytes(o, n).unwrap()))
        .collect();
    let mut dz = vec![vec![f32::NAN; 2 * m * d]; ranks];
    let mut kside = vec![vec![f32::NAN; n * d]; ranks];
    let mut shares = vec![f64::NAN; ranks];
    for r in 0..ranks {
        let mut s = RankScratch::carve(&mut carve_of(&mut arenas[r]), own[r], n).unwrap();
        let key = both_sides.then(|| DevPtrMut::host(&mut kside[r][..]));
        let share = DevPtrMut::host(&mut shares[r..r + 1]);
        let (zr, zg) = (DevPtr::host(&z[r][..]), DevPtr::host(global));
        let dzr = DevPtrMut::host(&mut dz[r][..]);
        enqueue_rows(e, zr, zg, own[r], &p, &mut s, dzr, key, share).unwrap();
    }
    if both_sides {
        // The reduce-scatter: rank r receives rows r 2m .. (r + 1) 2m of the sum over ranks.
        for r in 0..ranks {
            let rows = r * 2 * m * d..(r + 1) * 2 * m * d;
            let summed: Vec<f32> = rows.map(|i| kside.iter().map(|k| k[i]).sum()).collect();
            let s = RankScratch::carve(&mut carve_of(&mut arenas[r]), own[r], n).unwrap();
            let (zr, key) = (DevPtr::host(&z[r][..]), DevPtr::host(&summed[..]));
            enqueue_finish(e, zr, d, &s, key, DevPtrMut::host(&mut dz[r][..])).unwrap();
        }
    }
    let mut loss = [f64::NAN];
    enqueue_sum(e, DevPtr::host(&shares), DevPtrMut::host(&mut loss)).unwrap();
    (loss[0], dz)
}

#[test]
fn rank_rows_kernels_give_one_devices_loss_and_gradient() {
    let Some(e) = emulator("rank_rows_kernels_give_one_devices_loss_and_gradient") else {
        return;
    };
    // 3 ranks of 1 image (N = 6); 2 ranks of 37 (own rows over two 64-row tiles, N = 148 not a
    // multiple of the tile) with d = 130 (two 128-column sweeps, not a multiple of 4).
    let mut seed = 700;
    for (ranks, m, d) in [(3usize, 1usize, 3usize), (2, 37, 130)] {
        let n = 2 * ranks * m;
        for adversarial in [false, true] {
            seed += 1;
            let global = if adversarial {
                adversarial_matrix(&mut rng(seed), n, d)
            } else {
                random_matrix(&mut rng(seed), n, d)
            };
            for semantics in [GradSemantics::QueryOnly, GradSemantics::BothSides] {
                let cfg = LossConfig {
                    semantics,
                    ..LossConfig::default()
                };
                let case =
                    format!("{ranks} ranks x {m}, d {d}, adversarial {adversarial}, {semantics:?}");
                let want = reference::instance_loss(&global, n, d, &cfg, true).unwrap();
                let want_grad = want.grad_z.unwrap();
                let (loss, dz) = ranks_on_the_emulator(e, &global, (ranks, m, d), &cfg);
                let tol = CudaLossVersion::FusedV2.tolerance(cfg.tau, d, adversarial);
                let rel = (loss - want.loss).abs() / want.loss.abs();
                assert!(
                    rel < tol.loss,
                    "{case}: loss {loss} vs {} (rel {rel:e})",
                    want.loss
                );
                let layout = RankLayout::new(&vec![m; ranks]).unwrap();
                let mut got = vec![0.0f64; n * d];
                for (r, rows) in dz.iter().enumerate() {
                    let rows: Vec<f64> = rows.iter().map(|&x| f64::from(x)).collect();
                    layout.put_rank_rows(&rows, d, r, &mut got);
                }
                assert!(got.iter().all(|x| x.is_finite()), "{case}: not finite");
                if let Some(grad_tol) = tol.grad {
                    let err = scaled_grad_error(&got, &want_grad, &global, d);
                    assert!(err < grad_tol, "{case}: gradient error {err:e}");
                }
            }
        }
    }
}
