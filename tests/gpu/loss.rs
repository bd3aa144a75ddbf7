//! Every CUDA loss version against the float64 reference, forward and backward, both
//! semantics, over the loss issue's sizes, on random and adversarial inputs; determinism.
//! Skips without a GPU (`SKIPPED (no GPU): ...`), fails under REQUIRE_GPU=1.

use invaspread::loss::cuda::{self, CudaLossVersion};
use invaspread::loss::{reference, GradSemantics, LossConfig};
use invaspread::names::Named;
use invaspread::testing::{adversarial_matrix, gpu_or_skip, random_matrix, rng, scaled_grad_error};

fn check_all_versions(
    gpu: &std::sync::Arc<invaspread::cuda::Gpu>,
    z: &[f32],
    n: usize,
    d: usize,
    cfg: LossConfig,
    case: &str,
) {
    let adversarial = case.starts_with("adversarial");
    let want = reference::instance_loss(z, n, d, &cfg, true).unwrap();
    for version in CudaLossVersion::all() {
        let (loss, grad) = cuda::instance_loss(gpu.clone(), version, z, n, d, &cfg, true)
            .unwrap_or_else(|e| panic!("{} {case}: {e}", version.name()));
        let tolerance = version.tolerance(cfg.tau, d, adversarial);
        let (tol, grad_tol) = (tolerance.loss, tolerance.grad);
        let rel = (loss - want.loss).abs() / want.loss.abs();
        assert!(
            rel < tol,
            "{} {case}: loss {loss} vs {} (rel {rel:e})",
            version.name(),
            want.loss
        );
        let grad: Vec<f64> = grad.unwrap().iter().map(|&x| f64::from(x)).collect();
        assert!(
            grad.iter().all(|g| g.is_finite()),
            "{} {case}: gradient not finite",
            version.name()
        );
        if let Some(grad_tol) = grad_tol {
            let err = scaled_grad_error(&grad, want.grad_z.as_ref().unwrap(), z, d);
            assert!(
                err < grad_tol,
                "{} {case}: gradient error {err:e}",
                version.name()
            );
        }
        // The loss-only launch path is the same at every size; the emulator (seconds per loss
        // at N = 250) checks it on the small cases only.
        if gpu.is_virtual() && n > 64 {
            continue;
        }
        let (loss_only, none) =
            cuda::instance_loss(gpu.clone(), version, z, n, d, &cfg, false).unwrap();
        assert!(none.is_none());
        assert_eq!(
            loss_only.to_bits(),
            loss.to_bits(),
            "{} {case}: loss depends on with_grad",
            version.name()
        );
    }
}

/// On the virtual GPU (a CPU emulator, seconds per loss at N = 250) the cases above N = 300 or
/// N x d = 256 x 130 are left out, visibly; a real GPU runs them all.
fn runs_here(gpu: &invaspread::cuda::Gpu, n: usize, d: usize, skipped: &mut usize) -> bool {
    let fits = !gpu.is_virtual() || (n <= 300 && n * d <= 256 * 130);
    if !fits {
        *skipped += 1;
    }
    fits
}

fn report_skipped(test: &str, skipped: usize) {
    if skipped > 0 {
        invaspread::testing::virtual_gpu_note(
            test,
            &format!(
                "{skipped} cases (above N = 300 or N x d = 256 x 130, or above N = 64 the \
                 other gradient semantics) left to a real GPU"
            ),
        );
    }
}

const SEMANTICS: [GradSemantics; 2] = [GradSemantics::QueryOnly, GradSemantics::BothSides];

#[test]
fn every_version_every_size_against_the_reference() {
    let Some(gpu) = gpu_or_skip("every_version_every_size_against_the_reference") else {
        return;
    };
    let taus = [0.05, 0.1, 0.5];
    let mut i = 0u64;
    let mut skipped = 0;
    for n in [4usize, 6, 250, 256, 1000, 4098] {
        for d in [3usize, 64, 128, 130, 512] {
            if !runs_here(&gpu, n, d, &mut skipped) {
                i += 1;
                continue;
            }
            let z = random_matrix(&mut rng(700 + i), n, d);
            for (k, semantics) in SEMANTICS.into_iter().enumerate() {
                // The emulator runs one semantics per large size, alternating (both run at
                // every small size here and at N = 64 in every_hyper_parameter).
                if gpu.is_virtual() && n > 64 && k != i as usize % 2 {
                    skipped += 1;
                    continue;
                }
                let cfg = LossConfig {
                    tau: taus[i as usize % 3],
                    mu: [1.0, 2.0][(i as usize / 3) % 2],
                    semantics,
                    ..LossConfig::default()
                };
                check_all_versions(&gpu, &z, n, d, cfg, &format!("random N={n} d={d} {cfg:?}"));
            }
            i += 1;
        }
    }
    report_skipped("every_version_every_size_against_the_reference", skipped);
}

/// Small enough to run under compute-sanitizer (scripts/device-check.sh runs it there), and
/// still covering N not a multiple of the tiles and d not a multiple of 4.
#[test]
fn sanitizer_sized_cases() {
    let Some(gpu) = gpu_or_skip("sanitizer_sized_cases") else {
        return;
    };
    for (seed, n, d) in [(980u64, 6usize, 3usize), (981, 130, 130)] {
        let z = random_matrix(&mut rng(seed), n, d);
        for semantics in SEMANTICS {
            let cfg = LossConfig {
                tau: 0.1,
                mu: 2.0,
                semantics,
                ..LossConfig::default()
            };
            check_all_versions(&gpu, &z, n, d, cfg, &format!("random N={n} d={d} {cfg:?}"));
        }
    }
}

#[test]
fn every_hyper_parameter() {
    let Some(gpu) = gpu_or_skip("every_hyper_parameter") else {
        return;
    };
    // Every combination, at a size the virtual GPU runs in seconds.
    let (n, d) = if gpu.is_virtual() {
        (64, 130)
    } else {
        (250, 130)
    };
    let z = random_matrix(&mut rng(800), n, d);
    for tau in [0.05, 0.1, 0.5] {
        for mu in [1.0, 2.0] {
            for semantics in SEMANTICS {
                let cfg = LossConfig {
                    tau,
                    mu,
                    semantics,
                    ..LossConfig::default()
                };
                check_all_versions(&gpu, &z, n, d, cfg, &format!("random {cfg:?}"));
            }
        }
    }
}

#[test]
fn adversarial_inputs() {
    let Some(gpu) = gpu_or_skip("adversarial_inputs") else {
        return;
    };
    let mut skipped = 0;
    for (seed, n, d) in [
        (900u64, 6usize, 3usize),
        (901, 250, 64),
        (902, 256, 130),
        (903, 1000, 128),
        (904, 4098, 3),
    ] {
        if !runs_here(&gpu, n, d, &mut skipped) {
            continue;
        }
        let z = adversarial_matrix(&mut rng(seed), n, d);
        for tau in [0.05, 0.1, 0.5] {
            for semantics in SEMANTICS {
                let cfg = LossConfig {
                    tau,
                    mu: 1.0,
                    semantics,
                    ..LossConfig::default()
                };
                check_all_versions(
                    &gpu,
                    &z,
                    n,
                    d,
                    cfg,
                    &format!("adversarial N={n} d={d} {cfg:?}"),
                );
            }
        }
    }
    report_skipped("adversarial_inputs", skipped);
}

#[test]
fn every_version_is_deterministic() {
    let Some(gpu) = gpu_or_skip("every_version_is_deterministic") else {
        return;
    };
    let (n, d) = if gpu.is_virtual() {
        (258, 130)
    } else {
        (4098, 130)
    };
    let z = random_matrix(&mut rng(950), n, d);
    let cfg = LossConfig {
        tau: 0.1,
        mu: 1.0,
        semantics: GradSemantics::BothSides,
        ..LossConfig::default()
    };
    for version in CudaLossVersion::all() {
        let (l1, g1) = cuda::instance_loss(gpu.clone(), version, &z, n, d, &cfg, true).unwrap();
        let (l2, g2) = cuda::instance_loss(gpu.clone(), version, &z, n, d, &cfg, true).unwrap();
        assert_eq!(
            l1.to_bits(),
            l2.to_bits(),
            "{}: loss bits differ",
            version.name()
        );
        let bits = |g: Option<Vec<f32>>| g.unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(g1) == bits(g2),
            "{}: gradient bits differ between runs",
            version.name()
        );
    }
}

/// Hard and easy negatives in the unfused chain's selection kernel (unfused_select_v1) against
/// the float64 reference; fused v2 refuses them clearly.
#[test]
fn negative_selection_in_the_unfused_chain() {
    use invaspread::loss::Negatives;
    let Some(gpu) = gpu_or_skip("negative_selection_in_the_unfused_chain") else {
        return;
    };
    let mut skipped = 0;
    for (seed, n, d) in [
        (700u64, 6usize, 3usize),
        (701, 64, 20),
        (702, 250, 130),
        (703, 1000, 64),
    ] {
        if !runs_here(&gpu, n, d, &mut skipped) {
            continue;
        }
        for adversarial in [false, true] {
            let z = if adversarial {
                adversarial_matrix(&mut rng(seed), n, d)
            } else {
                random_matrix(&mut rng(seed), n, d)
            };
            for negatives in [
                Negatives::hard(0.5),
                Negatives::easy(0.5),
                Negatives::hard(0.1),
            ] {
                for semantics in SEMANTICS {
                    let cfg = LossConfig {
                        semantics,
                        negatives,
                        ..LossConfig::default()
                    };
                    let want = reference::instance_loss(&z, n, d, &cfg, true).unwrap();
                    // Near-duplicate rows tie in similarity at float32, and which member of a
                    // tie a row keeps is a coin the float64 reference tosses otherwise: the
                    // loss is continuous there (the members' terms are equal), the gradient is
                    // not (at a tie it is that of whichever member is kept). So adversarial
                    // inputs check the loss, and a finite gradient; random inputs both.
                    for version in [CudaLossVersion::Unfused, CudaLossVersion::UnfusedCublas] {
                        let case = format!(
                            "{} N={n} d={d} adversarial={adversarial} {cfg:?}",
                            version.name()
                        );
                        let (loss, grad) =
                            cuda::instance_loss(gpu.clone(), version, &z, n, d, &cfg, true)
                                .unwrap_or_else(|e| panic!("{case}: {e}"));
                        let tol = version.tolerance(cfg.tau, d, adversarial).loss;
                        let rel = (loss - want.loss).abs() / want.loss.abs();
                        assert!(rel < tol, "{case}: loss {loss} vs {} ({rel:e})", want.loss);
                        let grad: Vec<f64> = grad.unwrap().iter().map(|&x| f64::from(x)).collect();
                        assert!(grad.iter().all(|g| g.is_finite()), "{case}: not finite");
                        if !adversarial {
                            let err =
                                scaled_grad_error(&grad, want.grad_z.as_ref().unwrap(), &z, d);
                            assert!(err < tol, "{case}: gradient error {err:e}");
                        }
                    }
                    let err = cuda::instance_loss(
                        gpu.clone(),
                        CudaLossVersion::FusedV2,
                        &z,
                        n,
                        d,
                        &cfg,
                        true,
                    )
                    .unwrap_err()
                    .to_string();
                    assert!(err.contains("fused-v2 has no selection"), "{err}");
                }
            }
        }
    }
    report_skipped("negative_selection_in_the_unfused_chain", skipped);
}

/// Hard and easy negatives in fused v3 (instance_loss_select_v3_* and the row kernels'
/// `_select` variants) against the float64 reference. On +-1 rows (`sign_matrix`: every
/// similarity exact in TF32 and bf16, ties everywhere) the kept sets are the reference's, ties
/// by index included, so loss and gradient are checked at the version's bounds; on random
/// rows a similarity's operand rounding can swap two negatives of nearly equal similarity at
/// the threshold, which moves the loss by almost nothing but the gradient by a whole term, so
/// there the loss is checked, from d = 16 (at d = 4 one kept negative's rounding is not
/// averaged: 3.1e-4 measured for TF32 against its 3e-4). Sizes: N not a multiple of the 64-row
/// tile, d = 4, 16, 64.
#[test]
fn negative_selection_in_fused_v3() {
    use invaspread::loss::Negatives;
    use invaspread::testing::sign_matrix;
    let Some(gpu) = gpu_or_skip("negative_selection_in_fused_v3") else {
        return;
    };
    let versions = [CudaLossVersion::FusedV3Tf32, CudaLossVersion::FusedV3Bf16];
    for (seed, n, d) in [(720u64, 6usize, 4usize), (721, 70, 16), (722, 132, 64)] {
        for exact in [true, false] {
            if !exact && d < 16 {
                continue;
            }
            let z = if exact {
                sign_matrix(&mut rng(seed), n, d)
            } else {
                random_matrix(&mut rng(seed), n, d)
            };
            for (negatives, semantics) in [
                (Negatives::hard(0.5), GradSemantics::QueryOnly),
                (Negatives::easy(0.5), GradSemantics::BothSides),
                (Negatives::hard(0.1), GradSemantics::BothSides),
                (Negatives::easy(0.03), GradSemantics::QueryOnly),
                (Negatives::hard(1.0), GradSemantics::QueryOnly),
            ] {
                let cfg = LossConfig {
                    semantics,
                    negatives,
                    ..LossConfig::default()
                };
                let want = reference::instance_loss(&z, n, d, &cfg, true).unwrap();
                for version in versions {
                    let case = format!("{} N={n} d={d} exact={exact} {cfg:?}", version.name());
                    let (loss, grad) =
                        cuda::instance_loss(gpu.clone(), version, &z, n, d, &cfg, true)
                            .unwrap_or_else(|e| panic!("{case}: {e}"));
                    let tol = version.tolerance(cfg.tau, d, false);
                    let rel = (loss - want.loss).abs() / want.loss.abs();
                    assert!(
                        rel < tol.loss,
                        "{case}: loss {loss} vs {} ({rel:e})",
                        want.loss
                    );
                    let grad: Vec<f64> = grad.unwrap().iter().map(|&x| f64::from(x)).collect();
                    assert!(grad.iter().all(|g| g.is_finite()), "{case}: not finite");
                    if exact {
                        let grad_tol = tol.grad.expect("a gradient bound on non-adversarial rows");
                        let err = scaled_grad_error(&grad, want.grad_z.as_ref().unwrap(), &z, d);
                        assert!(err < grad_tol, "{case}: gradient error {err:e}");
                    }
                }
            }
        }
    }
}

/// The default hard/easy scale in every GPU version that selects (the unfused chain, fused
/// v3) against the authors' formula (tests/common/negatives.rs): F = 0.1 ... 1.0, hard and
/// easy, both semantics, N = 6 and 70 (not a multiple of the 64-row tile), d = 3 and 5, ties.
/// The loss is held at each version's bound; a gradient where the version's similarity error
/// cannot change the kept set (every row for the f32 chain, wide-gap rows for TF32 and bf16).
#[test]
fn the_default_is_the_official_formula_on_the_gpu() {
    use crate::common::negatives::{self, Bounds};
    let Some(gpu) = gpu_or_skip("the_default_is_the_official_formula_on_the_gpu") else {
        return;
    };
    let versions: Vec<CudaLossVersion> = CudaLossVersion::all()
        .filter(|v| v.version().entry().selects)
        .collect();
    assert_eq!(versions.len(), 4, "{versions:?}");
    let compared = negatives::hold_to_the_official_formula("gpu", |input, cfg| {
        let ties = input.name.starts_with("ties");
        versions
            .iter()
            .map(|&version| {
                let (loss, grad) = cuda::instance_loss(
                    gpu.clone(),
                    version,
                    &input.z,
                    input.n,
                    input.d,
                    cfg,
                    true,
                )
                .unwrap_or_else(|e| panic!("{} {}: {e}", version.name(), input.name));
                let tol = version.tolerance(cfg.tau, input.d, ties);
                // Cosine error of one similarity: float32 products, TF32 (10-bit mantissa)
                // and bf16 (7-bit) operands.
                let similarity = match version {
                    CudaLossVersion::FusedV3Tf32 => 2e-3,
                    CudaLossVersion::FusedV3Bf16 => 2e-2,
                    _ => 1e-6,
                };
                // At d <= 5 with a few kept negatives a tensor-core operand's rounding is not
                // averaged out (3.1e-4 measured for TF32 at N = 6, d = 3, one negative, against
                // its 3e-4): the registry's small-d factor on the gradient applies to the loss.
                let small_d = if similarity > 1e-6 && input.d < 16 {
                    4.0
                } else {
                    1.0
                };
                let bounds = Bounds {
                    loss: tol.loss * small_d,
                    // No gradient bound (tiny d with ties in the tensor-core versions): an
                    // infinite one still checks that the gradient is finite.
                    grad: tol.grad.unwrap_or(f64::INFINITY),
                    similarity,
                };
                let grad = grad.unwrap().iter().map(|&g| f64::from(g)).collect();
                (version.name(), bounds, (loss, grad))
            })
            .collect()
    });
    assert!(compared > 100, "only {compared} gradients compared");
}

#[test]
fn small_tau_is_a_clear_error_before_any_launch() {
    let cfg = LossConfig {
        tau: 0.01,
        ..LossConfig::default()
    };
    let err = cuda::validate_for_kernels(&cfg).unwrap_err();
    assert!(
        err.to_string().contains("tau = 0.01 is below 0.025"),
        "{err}"
    );
    assert!(cuda::validate_for_kernels(&LossConfig { tau: 0.025, ..cfg }).is_ok());
}

/// The tensor-core products alone (kernels/mma.cu): every lane's registers placed by the PTX
/// ISA's fragment tables (`ops::mma`), D compared exactly, on the card (or the virtual GPU).
#[test]
fn mma_fragment_layouts() {
    use invaspread::cuda::{DevPtr, DevPtrMut};
    use invaspread::ops::mma;
    let Some(gpu) = gpu_or_skip("mma_fragment_layouts") else {
        return;
    };
    let stream = gpu.stream();
    for shape in mma::Shape::ALL {
        for seed in 0..4 {
            let p = mma::Probe::random(shape, 40 + seed);
            let a = stream.clone_htod(&p.a_regs).unwrap();
            let b = stream.clone_htod(&p.b_regs).unwrap();
            let c = stream.clone_htod(&p.c).unwrap();
            let mut d = stream
                .clone_htod(&vec![f32::NAN; p.expected_d.len()])
                .unwrap();
            mma::cuda::probe(
                &*gpu,
                shape,
                DevPtr::of(&a),
                DevPtr::of(&b),
                DevPtr::of(&c),
                DevPtrMut::of(&mut d),
            )
            .unwrap();
            let got = stream.clone_dtoh(&d).unwrap();
            assert_eq!(got, p.expected_d, "{shape:?} seed {seed}");
        }
    }
}

/// The PyTorch op's path (`loss::cuda::foreign`): buffers handed in as raw device addresses and
/// the launches on a stream the caller made (here a second stream of the context, as
/// PyTorch's current stream is), against the reference; and what it refuses.
#[test]
fn a_stream_and_memory_handed_in_match_the_reference() {
    use invaspread::cuda::DevPtr;
    use invaspread::loss::cuda::foreign::{enqueue_on_stream, scratch_bytes, ForeignBuffers};
    use invaspread::loss::Negatives;
    let Some(gpu) = gpu_or_skip("a_stream_and_memory_handed_in_match_the_reference") else {
        return;
    };
    let own = gpu.stream().clone();
    let theirs = gpu.context().new_stream().unwrap();
    let addr = |s: &cudarc::driver::CudaSlice<f32>| DevPtr::of(s).addr();
    let cases = [(6usize, 3usize, false), (70, 5, false), (66, 130, true)];
    for (i, &(n, d, adversarial)) in cases.iter().enumerate() {
        let z = if adversarial {
            adversarial_matrix(&mut rng(900 + i as u64), n, d)
        } else {
            random_matrix(&mut rng(900 + i as u64), n, d)
        };
        for version in CudaLossVersion::all().filter(|v| *v != CudaLossVersion::UnfusedCublas) {
            for (k, semantics) in SEMANTICS.into_iter().enumerate() {
                let negatives = if version.version().entry().selects && k == 1 {
                    Negatives::hard(0.5)
                } else {
                    Negatives::All
                };
                let cfg = LossConfig {
                    tau: 0.1,
                    semantics,
                    negatives,
                    ..LossConfig::default()
                };
                let case = format!("{} N={n} d={d} {cfg:?}", version.name());
                let want = reference::instance_loss(&z, n, d, &cfg, true).unwrap();
                let z_dev = own.clone_htod(&z).unwrap();
                let dz_dev = own.clone_htod(&vec![f32::NAN; n * d]).unwrap();
                let bytes = scratch_bytes(version, n, d).unwrap();
                let scratch = own.alloc_zeros::<u8>(bytes).unwrap();
                let loss_dev = own.alloc_zeros::<f64>(1).unwrap();
                own.synchronize().unwrap();
                let bufs = ForeignBuffers {
                    z: addr(&z_dev),
                    dz: Some(DevPtr::of(&dz_dev).addr()),
                    scratch: DevPtr::of(&scratch).addr(),
                    scratch_len: bytes,
                    loss: DevPtr::of(&loss_dev).addr(),
                };
                // SAFETY: every buffer is live on this context until the stream is synchronised.
                unsafe {
                    enqueue_on_stream(&gpu, theirs.cu_stream() as u64, version, (n, d), &cfg, bufs)
                }
                .unwrap_or_else(|e| panic!("{case}: {e}"));
                theirs.synchronize().unwrap();
                let loss = own.clone_dtoh(&loss_dev).unwrap()[0];
                let grad: Vec<f64> = own
                    .clone_dtoh(&dz_dev)
                    .unwrap()
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                let tolerance = version.tolerance(cfg.tau, d, adversarial);
                let rel = (loss - want.loss).abs() / want.loss.abs();
                assert!(
                    rel < tolerance.loss,
                    "{case}: loss {loss} vs {} (rel {rel:e})",
                    want.loss
                );
                // TF32/bf16 similarities may keep another hard negative than the float64 truth
                // (negative_selection_in_fused_v3 checks their gradients on exact inputs).
                let selection_may_differ =
                    negatives != Negatives::All && version != CudaLossVersion::Unfused;
                assert!(
                    grad.iter().all(|g| g.is_finite()),
                    "{case}: gradient not finite"
                );
                if let (Some(grad_tol), false) = (tolerance.grad, selection_may_differ) {
                    let err = scaled_grad_error(&grad, want.grad_z.as_ref().unwrap(), &z, d);
                    assert!(err < grad_tol, "{case}: gradient error {err:e}");
                }
                // The loss alone, on the same scratch (its counter left at zero by the call).
                let bufs = ForeignBuffers { dz: None, ..bufs };
                // SAFETY: as above.
                unsafe {
                    enqueue_on_stream(&gpu, theirs.cu_stream() as u64, version, (n, d), &cfg, bufs)
                }
                .unwrap();
                theirs.synchronize().unwrap();
                let again = own.clone_dtoh(&loss_dev).unwrap()[0];
                assert_eq!(
                    again.to_bits(),
                    loss.to_bits(),
                    "{case}: loss depends on with_grad"
                );
            }
        }
    }

    // What is refused, each before anything is queued.
    let (n, d) = (8, 4);
    let cfg = LossConfig::default();
    let z_dev = own.clone_htod(&random_matrix(&mut rng(950), n, d)).unwrap();
    let bytes = scratch_bytes(CudaLossVersion::FusedV2, n, d).unwrap();
    let scratch = own.alloc_zeros::<u8>(bytes).unwrap();
    let loss_dev = own.alloc_zeros::<f64>(1).unwrap();
    let host = vec![0f32; n * d];
    let good = ForeignBuffers {
        z: addr(&z_dev),
        dz: None,
        scratch: DevPtr::of(&scratch).addr(),
        scratch_len: bytes,
        loss: DevPtr::of(&loss_dev).addr(),
    };
    let refused = [
        (
            CudaLossVersion::FusedV2,
            ForeignBuffers {
                scratch_len: bytes - 1,
                ..good
            },
            "expected at least",
        ),
        (
            CudaLossVersion::FusedV2,
            ForeignBuffers {
                z: host.as_ptr() as u64,
                ..good
            },
            "not device memory",
        ),
        (
            CudaLossVersion::FusedV2,
            ForeignBuffers { z: 0, ..good },
            "null device address",
        ),
        (
            CudaLossVersion::FusedV2,
            ForeignBuffers {
                loss: good.loss + 4,
                ..good
            },
            "not aligned",
        ),
        (CudaLossVersion::UnfusedCublas, good, "unfused-cublas"),
    ];
    for (version, bufs, needle) in refused {
        // SAFETY: refused before any launch (the case's point); the good buffers are live.
        let err = unsafe {
            enqueue_on_stream(&gpu, theirs.cu_stream() as u64, version, (n, d), &cfg, bufs)
        }
        .unwrap_err()
        .to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let hard = LossConfig {
        negatives: Negatives::hard(0.5),
        ..LossConfig::default()
    };
    // SAFETY: as above.
    let err = unsafe {
        enqueue_on_stream(
            &gpu,
            theirs.cu_stream() as u64,
            CudaLossVersion::FusedV2,
            (n, d),
            &hard,
            good,
        )
    }
    .unwrap_err()
    .to_string();
    assert!(err.contains("hard"), "{err}");
    if gpu.is_virtual() {
        invaspread::testing::virtual_gpu_note(
            "a_stream_and_memory_handed_in_match_the_reference",
            "ran on the virtual GPU; a real one runs it again in the device check",
        );
    }
}
