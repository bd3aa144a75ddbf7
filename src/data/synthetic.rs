//! The built-in dataset, generated from the seed (no file): ten classes of oriented stripes.

use rand::Rng;

use super::{Dataset, Split};
use crate::rng::rng;

/// Ten classes of stripes at orientations k * 18 degrees, with random frequency, phase,
/// colours and noise; `per_class` train and `test_per_class` test images, 32 x 32. Generated
/// from the seed, so it needs no file: the default of `invaspread train`.
pub fn synthetic(seed: u64, per_class: usize, test_per_class: usize) -> Dataset {
    let size = 32;
    let make = |count: usize, salt: u64| {
        let mut r = rng(seed ^ salt);
        let mut split = Split::default();
        for i in 0..count * 10 {
            let class = i % 10;
            let angle = class as f64 * std::f64::consts::PI / 10.0 + r.random_range(-0.05..0.05);
            let freq = r.random_range(0.12..0.3) * std::f64::consts::TAU;
            let phase = r.random_range(0.0..std::f64::consts::TAU);
            let c1: [f64; 3] = [r.random(), r.random(), r.random()];
            let c2: [f64; 3] = [r.random(), r.random(), r.random()];
            let (ca, sa) = (angle.cos(), angle.sin());
            for y in 0..size {
                for x in 0..size {
                    let t = ((x as f64 * ca + y as f64 * sa) * freq + phase).sin() * 0.5 + 0.5;
                    for ch in 0..3 {
                        let v = c1[ch] * t + c2[ch] * (1.0 - t) + r.random_range(-0.08..0.08);
                        split.images.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
                    }
                }
            }
            split.labels.push(class as i64);
        }
        split
    };
    Dataset {
        name: "synthetic".into(),
        classes: (0..10).map(|k| format!("stripes-{}deg", k * 18)).collect(),
        size,
        train: make(per_class, 0x7472),
        test: make(test_per_class, 0x7465),
        unlabeled: Split::default(),
        skipped: 0,
    }
}
