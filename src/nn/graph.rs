//! The tape: a Wengert list of ops in execution order, values and gradients by handle.
//!
//! Recording is the forward pass; [`Graph::backward`] walks the tape in reverse (execution
//! order is already a topological order, as in micrograd). Nodes are kept between steps and
//! their buffers reused: [`Graph::begin`] rewinds the tape, and the next step's ops overwrite
//! the same nodes, so the training loop does not allocate once shapes are steady.

use super::backend::Backend;
use super::params::{pair_mut, BnId, ParamId, ParamStore};
use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::ops::conv2d::Conv;
use crate::ops::{batchnorm, conv2d, linear, pool, Grad, Shape4};

/// A value on the tape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var(pub usize);

#[derive(Debug, Clone)]
enum Op {
    Input,
    Conv2d {
        x: Var,
        w: ParamId,
        conv: Conv,
    },
    BatchNorm {
        x: Var,
        bn: BnId,
        gamma: ParamId,
        beta: ParamId,
        training: bool,
        /// Followed by a fused ReLU (backends that fuse it).
        relu: bool,
    },
    Relu {
        x: Var,
    },
    Add {
        a: Var,
        b: Var,
    },
    AvgPool {
        x: Var,
        k: usize,
    },
    Flatten {
        x: Var,
    },
    Linear {
        x: Var,
        w: ParamId,
        b: ParamId,
        out: usize,
    },
    InstanceLoss {
        z: Var,
    },
    WeightedSum {
        x: Var,
    },
}

struct Node<B: Backend> {
    op: Op,
    shape: Shape4,
    value: B::Buffer,
    /// dL/dvalue, made by the first backward pass that forms it (never for a training
    /// step's input).
    grad: Option<B::Buffer>,
    /// Op-specific: dL/dz of the loss, the weights of a weighted sum; only those ops have one.
    scratch: Option<B::Buffer>,
    /// A batchnorm node's statistics for its backward.
    bn_saved: B::BnSaved,
}

/// A convolution of a step: its geometry, its input's shape, whether its backward forms dx.
#[derive(Debug, Clone, Copy)]
pub struct ConvUse {
    pub conv: Conv,
    pub input: Shape4,
    pub with_dx: bool,
}

/// Whether the backward pass forms the gradient of a value made by `op`: every op's output
/// does, a graph input only when `input_grads` is on.
fn receives_grad(input_grads: bool, op: &Op) -> bool {
    input_grads || !matches!(op, Op::Input)
}

/// `slot` as a buffer of `len` elements, made on first use: a node's gradient and scratch
/// exist only where an op needs them, so the tape holds no empty device buffers.
fn sized<'a, B: Backend>(
    backend: &B,
    slot: &'a mut Option<B::Buffer>,
    len: usize,
) -> Result<&'a mut B::Buffer> {
    match slot {
        Some(buf) => {
            backend.ensure_len(buf, len)?;
            Ok(buf)
        }
        None => Ok(slot.insert(backend.zeros(len)?)),
    }
}

/// The gradient buffer of an op's input, sized at the start of the backward pass (a free
/// function of the field, so that the node's value can be borrowed beside it).
fn grad_buffer<T>(grad: &mut Option<T>) -> Result<&mut T> {
    grad.as_mut()
        .ok_or_else(|| Error::invalid("internal: an op's input has no gradient buffer"))
}

/// Where an op's backward writes (or adds) the gradient of its input `x`.
fn input_grad<B: Backend>(x: &mut Node<B>, accumulate: bool) -> Result<Grad<&mut B::Buffer>> {
    Ok(Grad::new(grad_buffer(&mut x.grad)?, accumulate))
}

/// The gradient the backward pass formed for a node.
fn grad_of<T>(grad: &Option<T>) -> Result<&T> {
    grad.as_ref()
        .ok_or_else(|| Error::invalid("internal: no gradient was formed for this value"))
}

/// The scratch of a loss or weighted-sum node (made when the op was recorded).
fn scratch_of<T>(scratch: &Option<T>) -> Result<&T> {
    scratch
        .as_ref()
        .ok_or_else(|| Error::invalid("internal: a loss node without its gradient buffer"))
}

/// The nodes before `i` (an op's inputs) and node `i` itself.
fn split<B: Backend>(nodes: &mut [Node<B>], i: usize) -> (&mut [Node<B>], &mut Node<B>) {
    let (before, rest) = nodes.split_at_mut(i);
    (before, &mut rest[0])
}

/// A model's parameters, its backend and the tape of the current step.
pub struct Graph<B: Backend> {
    pub backend: B,
    pub params: ParamStore<B>,
    /// Whether inputs receive gradients (off in training: nothing reads them).
    pub input_grads: bool,
    nodes: Vec<Node<B>>,
    len: usize,
}

impl<B: Backend> Graph<B> {
    pub fn new(backend: B, params: ParamStore<B>) -> Self {
        Graph {
            backend,
            params,
            input_grads: false,
            nodes: Vec::new(),
            len: 0,
        }
    }

    /// Rewinds the tape for a new step; node buffers are kept for reuse.
    pub fn begin(&mut self) {
        self.len = 0;
    }

    /// The convolutions recorded this step: each with its input shape and whether its backward
    /// pass forms dx (what a floor is computed from).
    pub fn convolutions(&self) -> Vec<ConvUse> {
        self.nodes[..self.len]
            .iter()
            .filter_map(|node| match node.op {
                Op::Conv2d { x, conv, .. } => {
                    let input = &self.nodes[x.0];
                    Some(ConvUse {
                        conv,
                        input: input.shape,
                        with_dx: receives_grad(self.input_grads, &input.op),
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// Ops recorded this step.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn shape(&self, v: Var) -> Shape4 {
        self.nodes[v.0].shape
    }

    /// Appends (or reuses) the next node with an output of `shape`; returns its index.
    fn push(&mut self, op: Op, shape: Shape4) -> Result<usize> {
        let i = self.len;
        if i == self.nodes.len() {
            self.nodes.push(Node {
                op,
                shape,
                value: self.backend.zeros(shape.len())?,
                grad: None,
                scratch: None,
                bn_saved: B::BnSaved::default(),
            });
        } else {
            let node = &mut self.nodes[i];
            node.op = op;
            node.shape = shape;
            if self.backend.len(&node.value) != shape.len() {
                self.backend.reset(&mut node.value, shape.len())?;
            }
        }
        self.len += 1;
        Ok(i)
    }

    /// A batch of inputs (host f32, NCHW or N x features with h = w = 1).
    pub fn input(&mut self, host: &[f32], shape: Shape4) -> Result<Var> {
        if host.len() != shape.len() {
            return Err(Error::invalid(format!(
                "input has {} values, shape {shape:?} needs {}",
                host.len(),
                shape.len()
            )));
        }
        let i = self.push(Op::Input, shape)?;
        self.backend.upload(host, &mut self.nodes[i].value)?;
        Ok(Var(i))
    }

    pub fn conv2d(&mut self, x: Var, w: ParamId, conv: Conv) -> Result<Var> {
        let xs = self.shape(x);
        if xs.c != conv.c_in {
            return Err(Error::invalid(format!(
                "conv2d {}: input has {} channels, expected {}",
                self.params.param(w).name,
                xs.c,
                conv.c_in
            )));
        }
        let i = self.push(Op::Conv2d { x, w, conv }, conv.out_shape(xs))?;
        let (before, node) = split(&mut self.nodes, i);
        self.backend.conv2d_forward(conv2d::Forward {
            x: &before[x.0].value,
            xs,
            w: &self.params.params[w.0].value,
            conv,
            y: &mut node.value,
        })?;
        Ok(Var(i))
    }

    pub fn batchnorm(
        &mut self,
        x: Var,
        bn: BnId,
        gamma: ParamId,
        beta: ParamId,
        training: bool,
    ) -> Result<Var> {
        self.batchnorm_node(x, bn, gamma, beta, training, false)
    }

    /// relu(batchnorm(x)): one fused node where the backend fuses them (the CPU: a pass fewer
    /// each way, no stored pre-activation), otherwise the two ops.
    pub fn batchnorm_relu(
        &mut self,
        x: Var,
        bn: BnId,
        gamma: ParamId,
        beta: ParamId,
        training: bool,
    ) -> Result<Var> {
        if self.backend.fuses_batchnorm_relu() {
            return self.batchnorm_node(x, bn, gamma, beta, training, true);
        }
        let y = self.batchnorm_node(x, bn, gamma, beta, training, false)?;
        self.relu(y)
    }

    fn batchnorm_node(
        &mut self,
        x: Var,
        bn: BnId,
        gamma: ParamId,
        beta: ParamId,
        training: bool,
        relu: bool,
    ) -> Result<Var> {
        let xs = self.shape(x);
        let i = self.push(
            Op::BatchNorm {
                x,
                bn,
                gamma,
                beta,
                training,
                relu,
            },
            xs,
        )?;
        let (before, node) = split(&mut self.nodes, i);
        let (params, bns) = (&self.params.params, &mut self.params.bns);
        let buffers = &mut bns[bn.0];
        self.backend.batchnorm_forward(
            batchnorm::Forward {
                x: &before[x.0].value,
                xs,
                gamma: &params[gamma.0].value,
                beta: &params[beta.0].value,
                running_mean: &mut buffers.running_mean,
                running_var: &mut buffers.running_var,
                training,
                relu,
                y: &mut node.value,
            },
            &mut node.bn_saved,
        )?;
        if training {
            buffers.num_batches_tracked += 1;
        }
        Ok(Var(i))
    }

    pub fn relu(&mut self, x: Var) -> Result<Var> {
        let i = self.push(Op::Relu { x }, self.shape(x))?;
        let (before, node) = split(&mut self.nodes, i);
        self.backend
            .relu_forward(&before[x.0].value, &mut node.value)?;
        Ok(Var(i))
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        if self.shape(a) != self.shape(b) {
            return Err(Error::invalid(format!(
                "add: shapes {:?} and {:?} differ",
                self.shape(a),
                self.shape(b)
            )));
        }
        let i = self.push(Op::Add { a, b }, self.shape(a))?;
        let (before, node) = split(&mut self.nodes, i);
        let b_ = &self.backend;
        b_.copy_or_add(&before[a.0].value, Grad::new(&mut node.value, false))?;
        b_.copy_or_add(&before[b.0].value, Grad::new(&mut node.value, true))?;
        Ok(Var(i))
    }

    /// k x k average pooling with stride k; `k = H = W` is global pooling.
    pub fn avgpool(&mut self, x: Var, k: usize) -> Result<Var> {
        let xs = self.shape(x);
        if k == 0 || xs.h % k != 0 || xs.w % k != 0 {
            return Err(Error::invalid(format!(
                "avgpool: {}x{} is not divisible into {k}x{k} windows",
                xs.h, xs.w
            )));
        }
        let i = self.push(Op::AvgPool { x, k }, pool::out_shape(xs, k))?;
        let (before, node) = split(&mut self.nodes, i);
        self.backend
            .avgpool_forward(&before[x.0].value, xs, k, &mut node.value)?;
        Ok(Var(i))
    }

    /// N x C x H x W -> N x (C H W) (a copy; tiny next to the convolutions).
    pub fn flatten(&mut self, x: Var) -> Result<Var> {
        let xs = self.shape(x);
        let i = self.push(Op::Flatten { x }, Shape4::rows(xs.n, xs.image()))?;
        let (before, node) = split(&mut self.nodes, i);
        self.backend
            .copy_or_add(&before[x.0].value, Grad::new(&mut node.value, false))?;
        Ok(Var(i))
    }

    pub fn linear(&mut self, x: Var, w: ParamId, b: ParamId) -> Result<Var> {
        let xs = self.shape(x);
        let shape = &self.params.param(w).shape;
        let (out, inp) = (shape[0], shape[1]);
        if xs.image() != inp {
            return Err(Error::invalid(format!(
                "linear {}: input has {} features, expected {inp}",
                self.params.param(w).name,
                xs.image()
            )));
        }
        let i = self.push(Op::Linear { x, w, b, out }, Shape4::rows(xs.n, out))?;
        let (before, node) = split(&mut self.nodes, i);
        let p = &self.params.params;
        self.backend.linear_forward(linear::Forward {
            x: &before[x.0].value,
            n: xs.n,
            w: &p[w.0].value,
            b: &p[b.0].value,
            out,
            y: &mut node.value,
        })?;
        Ok(Var(i))
    }

    /// The instance loss of `z` (N x d; normalized inside), a scalar node. Its gradient is
    /// formed in the forward pass (the fused loss computes both) and applied in backward.
    pub fn instance_loss(&mut self, z: Var, cfg: &LossConfig) -> Result<Var> {
        let zs = self.shape(z);
        let i = self.push(Op::InstanceLoss { z }, Shape4::SCALAR)?;
        let (before, node) = split(&mut self.nodes, i);
        let dz = sized(&self.backend, &mut node.scratch, zs.len())?;
        self.backend.instance_loss(
            &before[z.0].value,
            (zs.n, zs.image()),
            cfg,
            &mut node.value,
            dz,
        )?;
        Ok(Var(i))
    }

    /// A loss of `z` computed elsewhere (a baseline's, on the host): the scalar `loss` and its
    /// gradient `dz` (one value per element of z), applied in backward as the instance loss's.
    pub fn given_loss(&mut self, z: Var, loss: f64, dz: &[f32]) -> Result<Var> {
        let zs = self.shape(z);
        if dz.len() != zs.len() {
            return Err(Error::invalid(format!(
                "given_loss: {} gradient values for {} elements",
                dz.len(),
                zs.len()
            )));
        }
        let i = self.push(Op::InstanceLoss { z }, Shape4::SCALAR)?;
        let node = &mut self.nodes[i];
        let scratch = sized(&self.backend, &mut node.scratch, dz.len())?;
        self.backend.upload(dz, scratch)?;
        self.backend.upload_f64(&[loss], &mut node.value)?;
        Ok(Var(i))
    }

    /// sum_i weights_i x_i, a scalar node (used by gradient checks to reduce any output).
    pub fn weighted_sum(&mut self, x: Var, weights: &[f32]) -> Result<Var> {
        let xs = self.shape(x);
        if weights.len() != xs.len() {
            return Err(Error::invalid("weighted_sum: one weight per element"));
        }
        let i = self.push(Op::WeightedSum { x }, Shape4::SCALAR)?;
        let (before, node) = split(&mut self.nodes, i);
        let scratch = sized(&self.backend, &mut node.scratch, weights.len())?;
        self.backend.upload(weights, scratch)?;
        let w = self.backend.download_f64(scratch)?;
        let v = self.backend.download_f64(&before[x.0].value)?;
        let s: f64 = w.iter().zip(&v).map(|(a, b)| a * b).sum();
        self.backend.upload_f64(&[s], &mut node.value)?;
        Ok(Var(i))
    }

    /// Overwrites a node's value (tests feed exact f64 inputs this way).
    pub fn set_value_f64(&mut self, v: Var, values: &[f64]) -> Result<()> {
        self.backend.upload_f64(values, &mut self.nodes[v.0].value)
    }

    /// Copies scalar node `v` into element `at` of `history` on the device (no wait): a
    /// training loop keeps the last steps' losses there and reads them every few steps.
    pub fn record_scalar(&self, v: Var, history: &mut B::Buffer, at: usize) -> Result<()> {
        if self.nodes[v.0].shape != Shape4::SCALAR {
            return Err(Error::invalid("record_scalar: the node is not a scalar"));
        }
        self.backend.copy_into(&self.nodes[v.0].value, history, at)
    }

    /// A node's value on the backend (until the next step overwrites it).
    pub fn buffer(&self, v: Var) -> &B::Buffer {
        &self.nodes[v.0].value
    }

    /// A node's value on the host.
    pub fn value(&self, v: Var) -> Result<Vec<f32>> {
        self.backend.download(&self.nodes[v.0].value)
    }

    pub fn value_f64(&self, v: Var) -> Result<Vec<f64>> {
        self.backend.download_f64(&self.nodes[v.0].value)
    }

    /// A node's gradient (after [`Graph::backward`]).
    pub fn grad_f64(&self, v: Var) -> Result<Vec<f64>> {
        self.backend.download_f64(grad_of(&self.nodes[v.0].grad)?)
    }

    /// Back-propagates from the scalar `root` (dL/droot = 1) through this step's tape,
    /// accumulating parameter gradients into `params` (zero them first with
    /// `params.zero_grad`). Node gradients are never cleared: the first op to reach a value
    /// writes its gradient, later ones add (so a value used twice gets both terms).
    pub fn backward(&mut self, root: Var) -> Result<()> {
        let mut ready = vec![false; self.len];
        // A loss root's dL/dL = 1 is applied directly (no upload, so nothing waits on the host).
        let root_is_loss = matches!(self.nodes[root.0].op, Op::InstanceLoss { .. });
        for (i, node) in self.nodes[..self.len].iter_mut().enumerate() {
            let is_loss_root = i == root.0 && root_is_loss;
            if receives_grad(self.input_grads, &node.op) && !is_loss_root {
                sized(&self.backend, &mut node.grad, node.shape.len())?;
            }
        }
        if !root_is_loss {
            self.backend
                .upload_f64(&[1.0], grad_buffer(&mut self.nodes[root.0].grad)?)?;
        }
        ready[root.0] = true;
        // The node after whose backward each parameter's gradient is final (its first use on
        // the tape): a data-parallel backend starts summing it over the ranks from there,
        // while the rest of the backward pass runs.
        let mut final_at = vec![usize::MAX; self.params.params.len()];
        for (i, node) in self.nodes[..=root.0].iter().enumerate().rev() {
            for p in params_of(&node.op).into_iter().flatten() {
                final_at[p.0] = i;
            }
        }
        let lens: Vec<usize> = self
            .params
            .params
            .iter()
            .map(|p| p.shape.iter().product())
            .collect();
        self.backend.gradients_begin(&lens)?;
        for i in (0..=root.0).rev() {
            if !ready[i] {
                continue; // nothing downstream used this value
            }
            let op = self.nodes[i].op.clone();
            let (before, node) = split(&mut self.nodes, i);
            // Whether input x already holds a gradient (then add), and mark it as holding one.
            let mut take = |x: Var| std::mem::replace(&mut ready[x.0], true);
            let ctx = BackwardStep {
                backend: &self.backend,
                params: &mut self.params,
                input_grads: self.input_grads,
                is_root: i == root.0,
            };
            let formed = params_of(&op);
            ctx.run(op, before, node, &mut take)?;
            for p in formed.into_iter().flatten() {
                if final_at[p.0] == i {
                    self.backend
                        .gradient_final(p.0, &self.params.params[p.0].grad)?;
                }
            }
        }
        Ok(())
    }
}

/// The parameters whose gradients an op's backward pass forms.
fn params_of(op: &Op) -> [Option<ParamId>; 2] {
    match *op {
        Op::Conv2d { w, .. } => [Some(w), None],
        Op::BatchNorm { gamma, beta, .. } => [Some(gamma), Some(beta)],
        Op::Linear { w, b, .. } => [Some(w), Some(b)],
        Op::Input
        | Op::Relu { .. }
        | Op::Add { .. }
        | Op::AvgPool { .. }
        | Op::Flatten { .. }
        | Op::InstanceLoss { .. }
        | Op::WeightedSum { .. } => [None, None],
    }
}

/// What the backward pass of one node needs besides the node and its inputs.
struct BackwardStep<'a, B: Backend> {
    backend: &'a B,
    params: &'a mut ParamStore<B>,
    input_grads: bool,
    is_root: bool,
}

impl<B: Backend> BackwardStep<'_, B> {
    /// Sends the gradient of `node` (its value computed by `op` from `before`) to the op's
    /// inputs and parameters; `take(x)` says whether x already holds a gradient, and marks it.
    fn run(
        self,
        op: Op,
        before: &mut [Node<B>],
        node: &mut Node<B>,
        take: &mut dyn FnMut(Var) -> bool,
    ) -> Result<()> {
        let (b, params) = (self.backend, self.params);
        match op {
            Op::Input => {}
            Op::Conv2d { x, w, conv } => {
                let xs = before[x.0].shape;
                let needs_dx = receives_grad(self.input_grads, &before[x.0].op);
                let acc = needs_dx && take(x);
                let p = &mut params.params[w.0];
                let xn = &mut before[x.0];
                b.conv2d_backward(conv2d::Backward {
                    x: &xn.value,
                    xs,
                    w: &p.value,
                    conv,
                    dy: grad_of(&node.grad)?,
                    dx: match needs_dx {
                        true => Some(Grad::new(grad_buffer(&mut xn.grad)?, acc)),
                        false => None,
                    },
                    dw: &mut p.grad,
                })?;
            }
            Op::BatchNorm {
                x,
                bn,
                gamma,
                beta,
                training,
                relu,
            } => {
                let xs = before[x.0].shape;
                let acc = take(x);
                let bufs = &params.bns[bn.0];
                let (pg, pb) = pair_mut(&mut params.params, gamma, beta);
                let xn = &mut before[x.0];
                b.batchnorm_backward(
                    batchnorm::Backward {
                        x: &xn.value,
                        xs,
                        gamma: &pg.value,
                        running_mean: &bufs.running_mean,
                        running_var: &bufs.running_var,
                        training,
                        relu,
                        dy: grad_of(&node.grad)?,
                        dx: Some(Grad::new(grad_buffer(&mut xn.grad)?, acc)),
                        dgamma: &mut pg.grad,
                        dbeta: &mut pb.grad,
                    },
                    &mut node.bn_saved,
                )?;
            }
            Op::Relu { x } => {
                let acc = take(x);
                let dx = input_grad(&mut before[x.0], acc)?;
                b.relu_backward(&node.value, grad_of(&node.grad)?, dx)?;
            }
            Op::Add { a, b: other } => {
                let acc = take(a);
                b.copy_or_add(grad_of(&node.grad)?, input_grad(&mut before[a.0], acc)?)?;
                let acc = take(other);
                b.copy_or_add(grad_of(&node.grad)?, input_grad(&mut before[other.0], acc)?)?;
            }
            Op::AvgPool { x, k } => {
                let xs = before[x.0].shape;
                let acc = take(x);
                b.avgpool_backward(
                    xs,
                    k,
                    grad_of(&node.grad)?,
                    input_grad(&mut before[x.0], acc)?,
                )?;
            }
            Op::Flatten { x } => {
                let acc = take(x);
                b.copy_or_add(grad_of(&node.grad)?, input_grad(&mut before[x.0], acc)?)?;
            }
            Op::Linear { x, w, b: bias, out } => {
                let xs = before[x.0].shape;
                let acc = take(x);
                let (pw, pb) = pair_mut(&mut params.params, w, bias);
                let xn = &mut before[x.0];
                b.linear_backward(linear::Backward {
                    x: &xn.value,
                    n: xs.n,
                    w: &pw.value,
                    out,
                    dy: grad_of(&node.grad)?,
                    dx: Some(Grad::new(grad_buffer(&mut xn.grad)?, acc)),
                    dw: &mut pw.grad,
                    db: &mut pb.grad,
                })?;
            }
            Op::InstanceLoss { z: x } | Op::WeightedSum { x } => {
                // A root's dL/dL = 1 (a loss root has no gradient buffer: nothing to read).
                let upstream = if self.is_root {
                    1.0
                } else {
                    b.download_f64(grad_of(&node.grad)?)?[0]
                };
                let acc = take(x);
                let dx = input_grad(&mut before[x.0], acc)?;
                b.axpy(upstream, scratch_of(&node.scratch)?, dx)?;
            }
        }
        Ok(())
    }
}
