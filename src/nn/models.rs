//! The encoders: CIFAR ResNet18 exactly as ../shared/notes/recipe.md (PyTorch's parameter
//! names), and a small ConvNet for fast CPU runs. Both end in Linear(-> 128); the instance
//! loss normalizes.

use rand_chacha::ChaCha8Rng;

use super::Encoder;
use crate::backend::Backend;
use crate::error::Result;
use crate::ops::conv2d::Conv;
use crate::rng::rng;
use crate::tape::params::{BnId, ParamId, ParamStore};
use crate::tape::{Graph, Var};

/// Which encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelKind {
    /// CIFAR ResNet18 (3x3 stem, no max-pool, 4 stages of 2 BasicBlocks, 512 -> 128).
    Resnet18Cifar,
    /// conv3x3-BN-ReLU x 4 (32, 64, 128, 256 channels; strides 1, 2, 2, 2), global average
    /// pooling, Linear(256 -> 128): about 15.2 M multiply-adds per 32 x 32 image (ResNet18:
    /// about 556 M).
    ConvnetSmall,
}
crate::serde_by_name!(ModelKind);

/// The embedding dimension of both encoders.
pub const EMBED_DIM: usize = 128;

/// conv (no bias) + batchnorm, with their parameter handles.
#[derive(Debug, Clone, Copy)]
struct ConvBn {
    conv: Conv,
    w: ParamId,
    bn: BnId,
    gamma: ParamId,
    beta: ParamId,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    c1: ConvBn,
    c2: ConvBn,
    shortcut: Option<ConvBn>,
}

/// An encoder's structure and parameter handles; the values live in the graph's store.
#[derive(Debug, Clone)]
pub struct Model {
    pub kind: ModelKind,
    stem: Vec<ConvBn>,
    blocks: Vec<Block>,
    linear_w: ParamId,
    linear_b: ParamId,
}

/// PyTorch's default init for conv and linear weights: kaiming_uniform(a = sqrt(5)) is
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)); linear biases likewise.
fn conv_bn<B: Backend>(
    store: &mut ParamStore<B>,
    b: &B,
    conv_name: &str,
    bn_name: &str,
    conv: Conv,
    r: &mut ChaCha8Rng,
) -> Result<ConvBn> {
    let bound = 1.0 / (conv.patch() as f64).sqrt();
    let w = store.add_uniform(
        b,
        format!("{conv_name}.weight"),
        vec![conv.c_out, conv.c_in, conv.k, conv.k],
        bound,
        r,
    )?;
    let (bn, gamma, beta) = store.add_batchnorm(b, bn_name, conv.c_out)?;
    Ok(ConvBn {
        conv,
        w,
        bn,
        gamma,
        beta,
    })
}

impl Model {
    /// Registers the model's parameters in `store` (PyTorch's names and init), seeded.
    pub fn new<B: Backend>(
        kind: ModelKind,
        store: &mut ParamStore<B>,
        backend: &B,
        seed: u64,
    ) -> Result<Model> {
        let r = &mut rng(seed);
        let conv = |c_in, c_out, k, stride, pad| Conv {
            c_in,
            c_out,
            k,
            stride,
            pad,
        };
        let mut stem = Vec::new();
        let mut blocks = Vec::new();
        let last = match kind {
            ModelKind::Resnet18Cifar => {
                stem.push(conv_bn(
                    store,
                    backend,
                    "conv1",
                    "bn1",
                    conv(3, 64, 3, 1, 1),
                    r,
                )?);
                let mut c_in = 64;
                for (stage, (c_out, stride)) in [(64, 1), (128, 2), (256, 2), (512, 2)]
                    .into_iter()
                    .enumerate()
                {
                    for i in 0..2 {
                        let p = format!("layer{}.{i}", stage + 1);
                        let s = if i == 0 { stride } else { 1 };
                        let c1 = conv_bn(
                            store,
                            backend,
                            &format!("{p}.conv1"),
                            &format!("{p}.bn1"),
                            conv(c_in, c_out, 3, s, 1),
                            r,
                        )?;
                        let c2 = conv_bn(
                            store,
                            backend,
                            &format!("{p}.conv2"),
                            &format!("{p}.bn2"),
                            conv(c_out, c_out, 3, 1, 1),
                            r,
                        )?;
                        let shortcut = if s != 1 || c_in != c_out {
                            Some(conv_bn(
                                store,
                                backend,
                                &format!("{p}.shortcut.0"),
                                &format!("{p}.shortcut.1"),
                                conv(c_in, c_out, 1, s, 0),
                                r,
                            )?)
                        } else {
                            None
                        };
                        blocks.push(Block { c1, c2, shortcut });
                        c_in = c_out;
                    }
                }
                512
            }
            ModelKind::ConvnetSmall => {
                let mut c_in = 3;
                for (i, (c_out, stride)) in [(32, 1), (64, 2), (128, 2), (256, 2)]
                    .into_iter()
                    .enumerate()
                {
                    stem.push(conv_bn(
                        store,
                        backend,
                        &format!("conv{}", i + 1),
                        &format!("bn{}", i + 1),
                        conv(c_in, c_out, 3, stride, 1),
                        r,
                    )?);
                    c_in = c_out;
                }
                256
            }
        };
        let bound = 1.0 / (last as f64).sqrt();
        let linear_w = store.add_uniform(
            backend,
            "linear.weight".into(),
            vec![EMBED_DIM, last],
            bound,
            r,
        )?;
        let linear_b =
            store.add_uniform(backend, "linear.bias".into(), vec![EMBED_DIM], bound, r)?;
        Ok(Model {
            kind,
            stem,
            blocks,
            linear_w,
            linear_b,
        })
    }

    fn conv_bn<B: Encoder>(g: &mut Graph<B>, x: Var, cb: &ConvBn, training: bool) -> Result<Var> {
        let y = g.conv2d(x, cb.w, cb.conv)?;
        g.batchnorm(y, cb.bn, cb.gamma, cb.beta, training)
    }

    fn conv_bn_relu<B: Encoder>(
        g: &mut Graph<B>,
        x: Var,
        cb: &ConvBn,
        training: bool,
    ) -> Result<Var> {
        let y = g.conv2d(x, cb.w, cb.conv)?;
        g.batchnorm_relu(y, cb.bn, cb.gamma, cb.beta, training)
    }

    /// The embeddings z (N x 128, not normalized) of a batch of images `x` (N x 3 x H x W).
    /// `training` selects batch statistics (and updates the running ones) in batchnorm.
    pub fn forward<B: Encoder>(&self, g: &mut Graph<B>, x: Var, training: bool) -> Result<Var> {
        let mut h = x;
        for cb in &self.stem {
            h = Self::conv_bn_relu(g, h, cb, training)?;
        }
        for block in &self.blocks {
            let y = Self::conv_bn_relu(g, h, &block.c1, training)?;
            let y = Self::conv_bn(g, y, &block.c2, training)?;
            let short = match &block.shortcut {
                Some(cb) => Self::conv_bn(g, h, cb, training)?,
                None => h,
            };
            let y = g.add(y, short)?;
            h = g.relu(y)?;
        }
        // Global average pooling (the reference's 4x4 pool at 32 px; global at any size).
        let s = g.shape(h);
        if s.h != s.w {
            return Err(crate::Error::InvalidInput(format!(
                "the encoder needs square images; its last map is {}x{}",
                s.h, s.w
            )));
        }
        let pooled = g.avgpool(h, s.h)?;
        let flat = g.flatten(pooled)?;
        g.linear(flat, self.linear_w, self.linear_b)
    }
}
