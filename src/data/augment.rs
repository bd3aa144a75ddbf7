//! The recipe's augmentation (../shared/notes/recipe.md), torchvision's semantics:
//! RandomResizedCrop(scale 0.2..1, ratio 3/4..4/3, bilinear, 10 tries then a centre crop),
//! ColorJitter(0.4, 0.4, 0.4, 0.4) with the four adjustments in random order,
//! RandomGrayscale(0.2), RandomHorizontalFlip(0.5), then Normalize.
//!
//! Every draw comes from a generator seeded by (seed, epoch, image, view), so a batch is the
//! same whatever the thread count or the order images are processed in, and a resumed run
//! sees exactly the views an uninterrupted one would.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::Split;

/// CIFAR-10's channel statistics, used by the recipe for both datasets.
pub const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const STD: [f32; 3] = [0.2023, 0.1994, 0.2010];

/// The augmentation's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentConfig {
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
    /// Brightness, contrast, saturation (factors in 1 +- x) and hue (shift in +- x turns).
    pub jitter: [f64; 4],
    pub grayscale_p: f64,
    pub flip_p: f64,
}

impl AugmentConfig {
    /// The recipe's.
    pub fn recipe() -> Self {
        AugmentConfig {
            scale: (0.2, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            jitter: [0.4; 4],
            grayscale_p: 0.2,
            flip_p: 0.5,
        }
    }
    /// No change at all (the crop is the whole image, no colour change, no flip).
    pub fn identity() -> Self {
        AugmentConfig {
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
            jitter: [0.0; 4],
            grayscale_p: 0.0,
            flip_p: 0.0,
        }
    }
}

/// Which of the recipe's four augmentations a run applies (the paper's ablation removes them
/// one by one): `crop` (RandomResizedCrop; without it the whole image), `jitter` (ColorJitter),
/// `grey` (RandomGrayscale), `flip` (RandomHorizontalFlip). Written as a list of those names,
/// `none` for the empty set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Augmentations {
    pub crop: bool,
    pub jitter: bool,
    pub grey: bool,
    pub flip: bool,
}

impl Augmentations {
    /// The names, in the recipe's order.
    pub const NAMES: [&'static str; 4] = ["crop", "jitter", "grey", "flip"];

    /// All four (the recipe; configurations from before the choice existed).
    pub fn all() -> Self {
        Augmentations {
            crop: true,
            jitter: true,
            grey: true,
            flip: true,
        }
    }

    fn flags(&self) -> [bool; 4] {
        [self.crop, self.jitter, self.grey, self.flip]
    }

    /// The recipe's parameters with the augmentations left out set to do nothing.
    pub fn config(&self) -> AugmentConfig {
        let (recipe, identity) = (AugmentConfig::recipe(), AugmentConfig::identity());
        let pick = |on: bool| if on { recipe } else { identity };
        AugmentConfig {
            scale: pick(self.crop).scale,
            ratio: pick(self.crop).ratio,
            jitter: pick(self.jitter).jitter,
            grayscale_p: pick(self.grey).grayscale_p,
            flip_p: pick(self.flip).flip_p,
        }
    }
}

impl Default for Augmentations {
    fn default() -> Self {
        Augmentations::all()
    }
}

impl std::str::FromStr for Augmentations {
    type Err = String;

    /// `crop,jitter,grey,flip` (any subset, any order), `none`, or `all`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "none" {
            return Ok(Augmentations {
                crop: false,
                jitter: false,
                grey: false,
                flip: false,
            });
        }
        if s == "all" {
            return Ok(Augmentations::all());
        }
        let mut on = [false; 4];
        for word in s.split(',').map(str::trim) {
            let i = Self::NAMES.iter().position(|&n| n == word).ok_or_else(|| {
                format!(
                    "{}: expected a comma-separated subset of {}, or none or all",
                    crate::error::excerpt(word),
                    Self::NAMES.join(", ")
                )
            })?;
            on[i] = true;
        }
        let [crop, jitter, grey, flip] = on;
        Ok(Augmentations {
            crop,
            jitter,
            grey,
            flip,
        })
    }
}

impl std::fmt::Display for Augmentations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = Self::NAMES
            .iter()
            .zip(self.flags())
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

impl TryFrom<Vec<String>> for Augmentations {
    type Error = String;
    fn try_from(names: Vec<String>) -> Result<Self, String> {
        if names.is_empty() {
            return "none".parse();
        }
        names.join(",").parse()
    }
}

impl From<Augmentations> for Vec<String> {
    fn from(a: Augmentations) -> Vec<String> {
        Augmentations::NAMES
            .iter()
            .zip(a.flags())
            .filter(|(_, on)| *on)
            .map(|(n, _)| n.to_string())
            .collect()
    }
}

/// A generator for one (epoch, image, view): splitmix64 of the four numbers.
pub fn view_rng(seed: u64, epoch: u64, index: u64, view: u64) -> ChaCha8Rng {
    let mut x = seed;
    for v in [epoch, index, view] {
        x = x.wrapping_add(v).wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
    }
    ChaCha8Rng::seed_from_u64(x)
}

/// torchvision's RandomResizedCrop.get_params: (top, left, height, width).
pub fn crop_params(
    rng: &mut impl Rng,
    h: usize,
    w: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> (usize, usize, usize, usize) {
    let area = (h * w) as f64;
    let (lo, hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area
            * if scale.0 < scale.1 {
                rng.random_range(scale.0..scale.1)
            } else {
                scale.0
            };
        let aspect = if lo < hi {
            rng.random_range(lo..hi)
        } else {
            lo
        }
        .exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let top = rng.random_range(0..=h - ch);
            let left = rng.random_range(0..=w - cw);
            return (top, left, ch, cw);
        }
    }
    // Fallback: the largest centred crop whose ratio lies within range.
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < ratio.0 {
        ((w as f64 / ratio.0).round() as usize, w)
    } else if in_ratio > ratio.1 {
        (h, (h as f64 * ratio.1).round() as usize)
    } else {
        (h, w)
    };
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// Bilinear resampling (half-pixel centres, as torch's align_corners=False) of the crop
/// (top, left, ch, cw) of an HWC f32 image of side `s` to `out x out`.
pub fn resized_crop(
    img: &[f32],
    s: usize,
    crop: (usize, usize, usize, usize),
    out: usize,
) -> Vec<f32> {
    let (top, left, ch, cw) = crop;
    let mut dst = vec![0.0f32; out * out * 3];
    let (sy, sx) = (ch as f32 / out as f32, cw as f32 / out as f32);
    for y in 0..out {
        let fy = ((y as f32 + 0.5) * sy - 0.5).clamp(0.0, (ch - 1) as f32);
        let (y0, ty) = (fy.floor() as usize, fy - fy.floor());
        let y1 = (y0 + 1).min(ch - 1);
        for x in 0..out {
            let fx = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, (cw - 1) as f32);
            let (x0, tx) = (fx.floor() as usize, fx - fx.floor());
            let x1 = (x0 + 1).min(cw - 1);
            for c in 0..3 {
                let p = |yy: usize, xx: usize| img[((top + yy) * s + left + xx) * 3 + c];
                let v = (1.0 - ty) * ((1.0 - tx) * p(y0, x0) + tx * p(y0, x1))
                    + ty * ((1.0 - tx) * p(y1, x0) + tx * p(y1, x1));
                dst[(y * out + x) * 3 + c] = v;
            }
        }
    }
    dst
}

fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

fn blend(img: &mut [f32], other: impl Fn(usize) -> f32, factor: f32) {
    for (i, v) in img.iter_mut().enumerate() {
        *v = (factor * *v + (1.0 - factor) * other(i)).clamp(0.0, 1.0);
    }
}

pub fn adjust_brightness(img: &mut [f32], factor: f32) {
    blend(img, |_| 0.0, factor);
}

/// Blends with the mean of the greyscale image.
pub fn adjust_contrast(img: &mut [f32], factor: f32) {
    let mean = img
        .chunks_exact(3)
        .map(|p| gray(p[0], p[1], p[2]))
        .sum::<f32>()
        / (img.len() / 3) as f32;
    blend(img, |_| mean, factor);
}

/// Blends with the greyscale image.
pub fn adjust_saturation(img: &mut [f32], factor: f32) {
    let g: Vec<f32> = img
        .chunks_exact(3)
        .map(|p| gray(p[0], p[1], p[2]))
        .collect();
    blend(img, |i| g[i / 3], factor);
}

/// Rotates the hue by `shift` turns (through HSV).
pub fn adjust_hue(img: &mut [f32], shift: f32) {
    for p in img.chunks_exact_mut(3) {
        let (r, g, b) = (p[0], p[1], p[2]);
        let (max, min) = (r.max(g).max(b), r.min(g).min(b));
        let delta = max - min;
        let mut h = if delta == 0.0 {
            0.0
        } else if max == r {
            ((g - b) / delta).rem_euclid(6.0) / 6.0
        } else if max == g {
            ((b - r) / delta + 2.0) / 6.0
        } else {
            ((r - g) / delta + 4.0) / 6.0
        };
        let s = if max == 0.0 { 0.0 } else { delta / max };
        h = (h + shift).rem_euclid(1.0);
        let (i, f) = ((h * 6.0).floor(), h * 6.0 - (h * 6.0).floor());
        let (pp, q, t) = (
            max * (1.0 - s),
            max * (1.0 - s * f),
            max * (1.0 - s * (1.0 - f)),
        );
        let (nr, ng, nb) = match i as i32 % 6 {
            0 => (max, t, pp),
            1 => (q, max, pp),
            2 => (pp, max, t),
            3 => (pp, q, max),
            4 => (t, pp, max),
            _ => (max, pp, q),
        };
        p[0] = nr;
        p[1] = ng;
        p[2] = nb;
    }
}

/// Converts HWC [0, 1] to normalized CHW.
pub fn normalize_chw(img: &[f32], size: usize, out: &mut [f32]) {
    let plane = size * size;
    for (i, p) in img.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] - MEAN[c]) / STD[c];
        }
    }
}

/// The draws of one augmented view, for tests of their statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Draws {
    pub crop: (usize, usize, usize, usize),
    pub order: [usize; 4],
    pub factors: [f64; 4],
    pub grayscale: bool,
    pub flip: bool,
}

/// Draws one view's parameters in the order torchvision does.
pub fn draw(rng: &mut impl Rng, size: usize, cfg: &AugmentConfig) -> Draws {
    let crop = crop_params(rng, size, size, cfg.scale, cfg.ratio);
    let mut order = [0, 1, 2, 3];
    for i in (1..4).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut factors = [1.0, 1.0, 1.0, 0.0];
    for (factor, &j) in factors.iter_mut().zip(&cfg.jitter[..3]) {
        if j > 0.0 {
            *factor = rng.random_range(1.0 - j..1.0 + j);
        }
    }
    if cfg.jitter[3] > 0.0 {
        factors[3] = rng.random_range(-cfg.jitter[3]..cfg.jitter[3]);
    }
    let grayscale = rng.random::<f64>() < cfg.grayscale_p;
    let flip = rng.random::<f64>() < cfg.flip_p;
    Draws {
        crop,
        order,
        factors,
        grayscale,
        flip,
    }
}

/// One augmented view of an HWC u8 image of side `size`, as normalized CHW f32.
pub fn augment(img: &[u8], size: usize, cfg: &AugmentConfig, rng: &mut impl Rng, out: &mut [f32]) {
    let d = draw(rng, size, cfg);
    let src: Vec<f32> = img.iter().map(|&v| f32::from(v) / 255.0).collect();
    let mut x = resized_crop(&src, size, d.crop, size);
    for &op in &d.order {
        let f = d.factors[op] as f32;
        match op {
            0 if cfg.jitter[0] > 0.0 => adjust_brightness(&mut x, f),
            1 if cfg.jitter[1] > 0.0 => adjust_contrast(&mut x, f),
            2 if cfg.jitter[2] > 0.0 => adjust_saturation(&mut x, f),
            3 if cfg.jitter[3] > 0.0 => adjust_hue(&mut x, f),
            _ => {}
        }
    }
    if d.grayscale {
        for p in x.chunks_exact_mut(3) {
            let g = gray(p[0], p[1], p[2]);
            p.fill(g);
        }
    }
    if d.flip {
        for row in x.chunks_exact_mut(size * 3) {
            for xx in 0..size / 2 {
                for c in 0..3 {
                    row.swap(xx * 3 + c, (size - 1 - xx) * 3 + c);
                }
            }
        }
    }
    normalize_chw(&x, size, out);
}

/// The test transform: only the normalization.
pub fn test_transform(img: &[u8], size: usize, out: &mut [f32]) {
    let src: Vec<f32> = img.iter().map(|&v| f32::from(v) / 255.0).collect();
    normalize_chw(&src, size, out);
}

/// A training batch: view A of every image, then view B of every image (the loss's layout),
/// N = 2 m images of 3 x size x size, built in parallel. `splits` form one index space, in
/// order (the labelled training split, then any unlabelled images).
pub fn two_view_batch(
    splits: &[&Split],
    size: usize,
    indices: &[usize],
    cfg: &AugmentConfig,
    seed: u64,
    epoch: u64,
) -> Vec<f32> {
    let m = indices.len();
    let per = 3 * size * size;
    let image = |mut i: usize| {
        for s in splits {
            if i < s.len() {
                return s.image(i, size);
            }
            i -= s.len();
        }
        panic!("image index {i} past the {} splits", splits.len())
    };
    let mut out = vec![0.0f32; 2 * m * per];
    out.par_chunks_mut(per).enumerate().for_each(|(slot, dst)| {
        let (view, i) = (slot / m, slot % m);
        let index = indices[i];
        let mut r = view_rng(seed, epoch, index as u64, view as u64);
        augment(image(index), size, cfg, &mut r, dst);
    });
    out
}

/// Test-transformed images `start..end` as one batch.
pub fn test_batch(split: &Split, size: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    let per = 3 * size * size;
    let mut out = vec![0.0f32; range.len() * per];
    out.par_chunks_mut(per)
        .zip(range)
        .for_each(|(dst, i)| test_transform(split.image(i, size), size, dst));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augmentation_sets_parse_print_and_round_trip_through_json() {
        let all: Augmentations = "crop,jitter,grey,flip".parse().unwrap();
        assert_eq!(all, Augmentations::all());
        let some: Augmentations = "flip, crop".parse().unwrap();
        assert_eq!(some.to_string(), "crop,flip");
        let none: Augmentations = "none".parse().unwrap();
        assert_eq!(none.to_string(), "none");
        assert_eq!(serde_json::to_string(&none).unwrap(), "[]");
        assert_eq!(serde_json::to_string(&some).unwrap(), r#"["crop","flip"]"#);
        let back: Augmentations = serde_json::from_str(r#"["crop","flip"]"#).unwrap();
        assert_eq!(back, some);
        let err = "crop,blur".parse::<Augmentations>().unwrap_err();
        assert!(
            err.contains("blur") && err.contains("crop, jitter, grey, flip"),
            "{err}"
        );
        assert!(serde_json::from_str::<Augmentations>(r#"["rotate"]"#).is_err());
    }

    #[test]
    fn each_left_out_augmentation_does_nothing_and_none_is_the_test_transform() {
        let (recipe, identity) = (AugmentConfig::recipe(), AugmentConfig::identity());
        let without = |name: &str| {
            let rest: Vec<&str> = Augmentations::NAMES
                .iter()
                .copied()
                .filter(|&n| n != name)
                .collect();
            rest.join(",").parse::<Augmentations>().unwrap().config()
        };
        assert_eq!(
            (without("crop").scale, without("crop").ratio),
            (identity.scale, identity.ratio)
        );
        assert_eq!(without("crop").jitter, recipe.jitter);
        assert_eq!(without("jitter").jitter, [0.0; 4]);
        assert_eq!(without("jitter").scale, recipe.scale);
        assert_eq!(without("grey").grayscale_p, 0.0);
        assert_eq!(without("flip").flip_p, 0.0);
        assert_eq!(without("flip").grayscale_p, recipe.grayscale_p);

        let size = 16;
        let img: Vec<u8> = (0..size * size * 3).map(|i| (i * 37 % 251) as u8).collect();
        let mut plain = vec![0.0f32; img.len()];
        test_transform(&img, size, &mut plain);
        let none = "none".parse::<Augmentations>().unwrap().config();
        let mut view = vec![0.0f32; img.len()];
        for seed in 0..8 {
            augment(&img, size, &none, &mut view_rng(seed, 0, 1, 0), &mut view);
            assert_eq!(
                view, plain,
                "seed {seed}: no augmentation is the test transform"
            );
        }
        augment(&img, size, &recipe, &mut view_rng(0, 0, 1, 0), &mut view);
        assert_ne!(view, plain, "the recipe changes the image");
    }
}
