//! One training step: both views of m images as one batch of N = 2m (view A rows first, as
//! the loss expects), forward, the instance loss, backward, SGD.

use super::models::{Model, ModelKind};
use super::optim::Sgd;
use super::Encoder;
use crate::backend::{Backend, Cpu};
use crate::cuda::{phase, GemmPrecision};
use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::ops::conv2d::CpuVersion;
use crate::ops::Shape4;
use crate::tape::{Graph, Var};

/// Runs one step on `views` (N x 3 x H x W, N = 2m: rows 0..m view A, m..2m view B of the
/// same images) and returns the loss before the update (waiting for the device to finish).
pub fn train_step<B: Encoder>(
    graph: &mut Graph<B>,
    model: &Model,
    sgd: &mut Sgd,
    views: &[f32],
    shape: Shape4,
    loss_cfg: &LossConfig,
    lr: f64,
) -> Result<f64> {
    let loss = queue_train_step(graph, model, sgd, views, shape, loss_cfg, lr)?;
    Ok(graph.value_f64(loss)?[0])
}

/// [`train_step`] without reading the loss back: on a GPU every launch is only queued, and the
/// returned node holds the loss until the graph's next step (see [`Graph::record_scalar`]).
pub fn queue_train_step<B: Encoder>(
    graph: &mut Graph<B>,
    model: &Model,
    sgd: &mut Sgd,
    views: &[f32],
    shape: Shape4,
    loss_cfg: &LossConfig,
    lr: f64,
) -> Result<Var> {
    if !shape.n.is_multiple_of(2) || shape.n < 4 || shape.c != 3 || shape.h == 0 || shape.w == 0 {
        return Err(Error::invalid(format!(
            "a training batch is 2m x 3 x H x W with m >= 2 and H, W >= 1, got {shape:?}"
        )));
    }
    queue_step(graph, model, sgd, (views, shape), lr, |g, z, _| {
        g.instance_loss(z, loss_cfg)
    })
}

/// One step of any loss: the encoder on `input` (its `shape`), `loss(graph, z, sgd step)`
/// recording the loss of its output z, backward, SGD (after the gradient hook's final values,
/// a data-parallel group's sums). Returns the loss node; nothing is read back.
pub fn queue_step<B: Encoder>(
    graph: &mut Graph<B>,
    model: &Model,
    sgd: &mut Sgd,
    (input, shape): (&[f32], Shape4),
    lr: f64,
    loss: impl FnOnce(&mut Graph<B>, Var, u64) -> Result<Var>,
) -> Result<Var> {
    // NVTX ranges (no-ops without libnvToolsExt) so that Nsight shows the step's parts: they
    // mark when the host queues each part; the GPU's work follows on the stream.
    graph.begin();
    let z = {
        let _range = phase("forward");
        let x = graph.input(input, shape)?;
        model.forward(graph, x, true)?
    };
    let loss = {
        let _range = phase("loss");
        loss(graph, z, sgd.step)?
    };
    {
        let _range = phase("backward");
        graph.params.zero_grad(&graph.backend)?;
        graph.backward(loss)?;
    }
    let _range = phase("sgd");
    graph.finish_gradients()?;
    sgd.update(&graph.backend, &mut graph.params, lr)?;
    Ok(loss)
}

/// A batch of `images` images of 32 x 32 as two views (2 x images rows, view A first) of seeded
/// random pixels: what the training benchmarks time and check.
pub fn random_views(images: usize, seed: u64) -> (Shape4, Vec<f32>) {
    let shape = Shape4 {
        n: 2 * images,
        c: 3,
        h: 32,
        w: 32,
    };
    (
        shape,
        crate::rng::random_matrix(&mut crate::rng::rng(seed), 1, shape.len()),
    )
}

/// How one training step on a backend agrees with the same step (same initialisation, batch
/// and learning rate) on the float32 CPU backend. The training benchmarks check it before they
/// time a backend: a fast step that computes something else is worth nothing.
#[derive(Debug, Clone, Copy)]
pub struct StepAgreement {
    /// The step's loss on the backend, and on the CPU.
    pub loss: f64,
    pub cpu_loss: f64,
    /// ||du - du_cpu|| / ||du_cpu|| over every parameter's update at once (L2): one number that
    /// the largest updates dominate, so that a tensor whose update cancels to noise in float32
    /// (batchnorm's backward) does not decide it.
    pub update_error: f64,
}

impl StepAgreement {
    /// The worse of the loss's relative difference and the update error.
    pub fn error(&self) -> f64 {
        let loss = (self.loss - self.cpu_loss).abs() / self.cpu_loss.abs().max(f64::MIN_POSITIVE);
        let worst = loss.max(self.update_error);
        if worst.is_nan() {
            f64::INFINITY
        } else {
            worst
        }
    }

    /// [`StepAgreement::error`], or an error naming `what` when it is above `tolerance`.
    pub fn check(&self, what: &str, tolerance: f64) -> Result<f64> {
        let err = self.error();
        if err <= tolerance {
            Ok(err)
        } else {
            Err(Error::invalid(format!(
                "{what}: one training step disagrees with the CPU's: loss {} against {}, update \
                 error {:.3e}; {err:.3e} is above {tolerance:.1e}",
                self.loss, self.cpu_loss, self.update_error
            )))
        }
    }
}

/// How far one step on CUDA in `precision` may be from the CPU's float32 step ([`StepAgreement::error`]).
/// Measured on the virtual GPU (whose GEMMs round operands as the tensor cores do), batches of
/// 4 and 16 images: float32 3e-3 (the CPU's own float32 error: the step is ill-conditioned,
/// batchnorm's backward cancelling), TF32 0.10, bf16 0.28 from convnet-small to resnet18-cifar.
/// An unrelated update is about 1.4 away, so the TF32 and bf16 bounds catch gross breakage
/// only; the float32 bound, and tests/gpu/nn.rs against float64, are the precise checks.
pub fn step_tolerance(precision: GemmPrecision) -> f64 {
    match precision {
        GemmPrecision::F32 => 1e-2,
        GemmPrecision::Tf32 => 0.25,
        GemmPrecision::Bf16 => 0.6,
    }
}

/// One step of `kind` (seed 0, SGD's defaults, lr 0.03) on `backend` and on the float32 CPU
/// backend from the same initialisation and `views`; see [`StepAgreement`]. The CPU runs its
/// im2col convolutions, its float32 version nearest to float64: Winograd's own rounding is of
/// the same size as the float32 bound (resnet18-cifar, 2 images: 1.26e-2 against CUDA f32).
pub fn first_step_agreement<B: Encoder>(
    kind: ModelKind,
    backend: B,
    views: &[f32],
    shape: Shape4,
) -> Result<StepAgreement> {
    let cpu = || Cpu::<f32>::new().with_option(CpuVersion::Im2col);
    let (before, _) = one_step(kind, cpu(), views, shape, false)?;
    let (want, cpu_loss) = one_step(kind, cpu(), views, shape, true)?;
    let (got, loss) = one_step(kind, backend, views, shape, true)?;
    Ok(StepAgreement {
        loss,
        cpu_loss,
        update_error: update_error(&before, &got, &want),
    })
}

/// ||du_got - du_want|| / ||du_want|| (L2), du = after - `before`: how far an update is from
/// the reference's ([`StepAgreement::update_error`]); NaN when `got` is not finite.
pub fn update_error(before: &[f32], got: &[f32], want: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for ((g, w), b) in got.iter().zip(want).zip(before) {
        let (du_g, du_w) = (f64::from(g - b), f64::from(w - b));
        diff += (du_g - du_w) * (du_g - du_w);
        norm += du_w * du_w;
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// Every parameter after one step (or none) of `kind` from seed 0, concatenated, and the loss.
fn one_step<B: Encoder>(
    kind: ModelKind,
    backend: B,
    views: &[f32],
    shape: Shape4,
    step: bool,
) -> Result<(Vec<f32>, f64)> {
    let mut store = crate::tape::ParamStore::default();
    let model = Model::new(kind, &mut store, &backend, 0)?;
    let mut graph = Graph::new(backend, store);
    let mut sgd = Sgd::new(super::optim::SgdConfig::default());
    let loss = if step {
        train_step(
            &mut graph,
            &model,
            &mut sgd,
            views,
            shape,
            &LossConfig::default(),
            0.03,
        )?
    } else {
        0.0
    };
    let mut values = Vec::new();
    for p in &graph.params.params {
        values.extend(graph.backend.download(&p.value)?);
    }
    Ok((values, loss))
}
