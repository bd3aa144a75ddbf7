//! The row-normalization kernels against the CPU version (float64 accumulation). Skips without
//! a GPU (`SKIPPED (no GPU): ...`), fails under REQUIRE_GPU=1.

use invaspread::cuda::{DevPtr, DevPtrMut};
use invaspread::ops::normalize_rows::{self, Version};
use invaspread::testing::{gpu_or_skip, random_matrix, rng};

fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want
        .iter()
        .fold(0.0f64, |m, &x| m.max(f64::from(x).abs()))
        .max(f64::MIN_POSITIVE);
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g.is_nan() {
                f64::INFINITY
            } else {
                (f64::from(g) - f64::from(w)).abs() / scale
            }
        })
        .fold(0.0, f64::max)
}

#[test]
fn normalize_rows_v1_matches_cpu_forward_and_backward() {
    let Some(gpu) = gpu_or_skip("normalize_rows_v1_matches_cpu_forward_and_backward") else {
        return;
    };
    let stream = gpu.stream();
    for (seed, n, d) in [
        (1u64, 4usize, 3usize),
        (2, 13, 1),
        (3, 250, 130),
        (4, 1000, 128),
        (5, 77, 513),
        (6, 4098, 64),
    ] {
        let mut r = rng(seed);
        let mut z = random_matrix(&mut r, n, d);
        // Very large and very small norms, and a zero row (the clamp's branch). The kernel sums
        // squares in float32, so norms above ~1e19 would overflow: see normalize_rows.cu.
        z[..d].iter_mut().for_each(|x| *x *= 1e15);
        z[d..2 * d].iter_mut().for_each(|x| *x *= 1e-15);
        if n > 4 {
            z[2 * d..3 * d].fill(0.0);
        }
        let grad_f = random_matrix(&mut r, n, d);
        let (f_cpu, norms_cpu) = normalize_rows::cpu::forward(&z, n, d).unwrap();
        let dz_cpu = normalize_rows::cpu::backward(&f_cpu, &norms_cpu, &grad_f, n, d).unwrap();

        let z_dev = stream.clone_htod(&z).unwrap();
        let nan = vec![f32::NAN; n * d];
        let mut f_dev = stream.clone_htod(&nan).unwrap();
        let mut norms_dev = stream.clone_htod(&nan[..n]).unwrap();
        normalize_rows::cuda::forward(
            &*gpu,
            Version::V1,
            DevPtr::of(&z_dev),
            DevPtrMut::of(&mut f_dev),
            DevPtrMut::of(&mut norms_dev),
            (n, d),
        )
        .unwrap();
        let f_gpu = stream.clone_dtoh(&f_dev).unwrap();
        let norms_gpu = stream.clone_dtoh(&norms_dev).unwrap();

        let grad_dev = stream.clone_htod(&grad_f).unwrap();
        let mut dz_dev = stream.clone_htod(&nan).unwrap();
        normalize_rows::cuda::backward(
            &*gpu,
            Version::V1,
            DevPtr::of(&f_dev),
            DevPtr::of(&norms_dev),
            DevPtr::of(&grad_dev),
            DevPtrMut::of(&mut dz_dev),
            (n, d),
        )
        .unwrap();
        let dz_gpu = stream.clone_dtoh(&dz_dev).unwrap();

        let case = format!("seed {seed} N={n} d={d}");
        assert!(
            max_rel_err(&f_gpu, &f_cpu) < 1e-5,
            "{case}: f err {}",
            max_rel_err(&f_gpu, &f_cpu)
        );
        for a in 0..n {
            let (g, w) = (norms_gpu[a], norms_cpu[a]);
            assert!(
                (g - w).abs() <= 1e-5 * w.abs(),
                "{case}: norm[{a}] {g} vs {w}"
            );
            // Row by row (the rows' gradients differ by many orders of magnitude), relative to
            // the row's natural scale max|df_a| / max(norm_a, eps): dz_a itself can be pure
            // rounding (d = 1, where the exact gradient is 0).
            let row = a * d..(a + 1) * d;
            let scale = grad_f[row.clone()]
                .iter()
                .fold(0.0f64, |m, &x| m.max(f64::from(x).abs()))
                / f64::from(w.max(1e-12));
            let err = dz_gpu[row.clone()]
                .iter()
                .zip(&dz_cpu[row])
                .map(|(&g, &c)| (f64::from(g) - f64::from(c)).abs() / scale)
                .fold(
                    0.0,
                    |m: f64, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
                );
            assert!(err < 1e-5, "{case}: dz row {a} err {err}");
        }
    }
}
