//! A 2-D picture of embeddings: their projection on the first two principal components (the
//! top eigenvectors of the covariance, by power iteration with deflation, in float64 from a
//! fixed start, so the same embeddings give the same picture).

use crate::error::{Error, Result};

/// The first two principal components of `d`-wide rows and what they show.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// Each row's coordinates on the two components.
    pub points: Vec<(f64, f64)>,
    /// The share of the total variance along each component.
    pub explained: [f64; 2],
}

/// Power iteration on the symmetric `d x d` matrix `c` from a fixed start.
fn top_eigenvector(c: &[f64], d: usize) -> (Vec<f64>, f64) {
    let mut v: Vec<f64> = (0..d).map(|i| 1.0 + (i as f64 * 0.618).fract()).collect();
    let mut value = 0.0;
    for _ in 0..1000 {
        let mut w: Vec<f64> = (0..d)
            .map(|i| (0..d).map(|j| c[i * d + j] * v[j]).sum())
            .collect();
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            return (v, 0.0);
        }
        w.iter_mut().for_each(|x| *x /= norm);
        let change: f64 = w.iter().zip(&v).map(|(a, b)| (a - b).abs()).sum();
        v = w;
        value = norm;
        if change < 1e-12 {
            break;
        }
    }
    // A fixed sign: the largest coordinate positive.
    let big = v
        .iter()
        .fold(0.0f64, |m, &x| if x.abs() > m.abs() { x } else { m });
    if big < 0.0 {
        v.iter_mut().for_each(|x| *x = -*x);
    }
    (v, value)
}

/// Projects the rows of `x` (`d` wide) on their first two principal components.
pub fn pca_2d(x: &[f32], d: usize) -> Result<Projection> {
    if d < 2 || !x.len().is_multiple_of(d) || x.len() < 2 * d {
        return Err(Error::invalid(format!(
            "PCA: {} values are not 2 rows or more of {d} (at least 2 wide)",
            x.len()
        )));
    }
    let n = x.len() / d;
    let mut mean = vec![0.0f64; d];
    for row in x.chunks_exact(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v) / n as f64;
        }
    }
    let mut cov = vec![0.0f64; d * d];
    for row in x.chunks_exact(d) {
        let centred: Vec<f64> = row
            .iter()
            .zip(&mean)
            .map(|(&v, m)| f64::from(v) - m)
            .collect();
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] += centred[i] * centred[j] / n as f64;
            }
        }
    }
    let total: f64 = (0..d).map(|i| cov[i * d + i]).sum();
    let (first, l1) = top_eigenvector(&cov, d);
    for i in 0..d {
        for j in 0..d {
            cov[i * d + j] -= l1 * first[i] * first[j];
        }
    }
    let (second, l2) = top_eigenvector(&cov, d);
    let along = |row: &[f32], axis: &[f64]| -> f64 {
        row.iter()
            .zip(&mean)
            .zip(axis)
            .map(|((&v, m), a)| (f64::from(v) - m) * a)
            .sum()
    };
    let points = x
        .chunks_exact(d)
        .map(|row| (along(row, &first), along(row, &second)))
        .collect();
    let share = |l: f64| if total > 0.0 { l / total } else { 0.0 };
    Ok(Projection {
        points,
        explained: [share(l1), share(l2)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_components_are_the_directions_of_most_variance() {
        // Points spread 10 along (1, 1, 0)/sqrt 2, 3 along z, 0.1 along (1, -1, 0)/sqrt 2.
        let mut x = Vec::new();
        for i in 0..200 {
            let t = (i as f64 * 0.37).sin();
            let u = (i as f64 * 1.91).cos();
            let w = (i as f64 * 2.73).sin();
            let (a, b, c) = (10.0 * t, 3.0 * u, 0.1 * w);
            let s = std::f64::consts::FRAC_1_SQRT_2;
            x.extend([(a * s + c * s) as f32, (a * s - c * s) as f32, b as f32]);
        }
        let p = pca_2d(&x, 3).unwrap();
        assert!(
            p.explained[0] > 0.85 && p.explained[1] > 0.05,
            "{:?}",
            p.explained
        );
        assert!(p.explained[0] + p.explained[1] > 0.999, "{:?}", p.explained);
        // Each point's first coordinate is its centred position along (1, 1, 0)/sqrt 2.
        let along: Vec<f64> = x
            .chunks(3)
            .map(|r| (f64::from(r[0]) + f64::from(r[1])) * std::f64::consts::FRAC_1_SQRT_2)
            .collect();
        let mean = along.iter().sum::<f64>() / along.len() as f64;
        for (a, (pc1, _)) in along.iter().zip(&p.points) {
            // (the three sampled waves are not exactly uncorrelated: PC 1 tilts a little)
            assert!((pc1 - (a - mean)).abs() < 0.05, "{pc1} vs {}", a - mean);
        }
        assert!(pca_2d(&x[..3], 3).is_err());
    }
}
