//! One training step: both views of m images as one batch of N = 2m (view A rows first, as
//! the loss expects), forward, the instance loss, backward, SGD.

use super::backend::Backend;
use super::graph::{Graph, Var};
use super::models::Model;
use super::optim::Sgd;
use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::ops::Shape4;

/// Runs one step on `views` (N x 3 x H x W, N = 2m: rows 0..m view A, m..2m view B of the
/// same images) and returns the loss before the update (waiting for the device to finish).
pub fn train_step<B: Backend>(
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
pub fn queue_train_step<B: Backend>(
    graph: &mut Graph<B>,
    model: &Model,
    sgd: &mut Sgd,
    views: &[f32],
    shape: Shape4,
    loss_cfg: &LossConfig,
    lr: f64,
) -> Result<Var> {
    if shape.n % 2 != 0 || shape.c != 3 {
        return Err(Error::invalid(format!(
            "a training batch is 2m x 3 x H x W, got {shape:?}"
        )));
    }
    graph.begin();
    let x = graph.input(views, shape)?;
    let z = model.forward(graph, x, true)?;
    let loss = graph.instance_loss(z, loss_cfg)?;
    graph.params.zero_grad(&graph.backend)?;
    graph.backward(loss)?;
    sgd.update(&graph.backend, &mut graph.params, lr)?;
    Ok(loss)
}
