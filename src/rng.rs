//! Seeded random numbers: every random choice of the crate (initialisation, synthetic data,
//! data order, augmentation, test inputs) comes from a generator seeded here, so a run or a
//! failing case can be replayed from its seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded generator.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// N x d standard-normal-ish entries (sum of uniforms; exact distribution does not matter).
pub fn random_matrix(rng: &mut impl Rng, n: usize, d: usize) -> Vec<f32> {
    (0..n * d)
        .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 1.7)
        .collect()
}
