//! The tape: a Wengert list of ops in execution order, values and gradients by handle, and a
//! model's parameters. It knows no op: each op's folder (`ops::<op>::node`, `loss::node`)
//! defines its [`TapeOp`] (inputs, parameters, backward) and the `Graph` method that records
//! it through [`Graph::record`].
//!
//! Recording is the forward pass; [`Graph::backward`] walks the tape in reverse (execution
//! order is already a topological order, as in micrograd). Nodes are kept between steps and
//! their buffers reused: [`Graph::begin`] rewinds the tape, and the next step's ops overwrite
//! the same nodes, so the training loop allocates no device memory once shapes are steady.
//!
//! A layer above may take over some ops (a data-parallel group: the loss over the gathered
//! batch, BatchNorm's statistics over the global batch, the gradients summed while the
//! backward pass runs): it registers its hooks as typed [`Extensions`] of the graph, which the
//! ops of those folders look up, and the backward pass tells a [`GradientHook`] each
//! parameter gradient as it becomes final (PyTorch DDP's reducer).

pub mod params;
pub mod shape;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
pub use params::{BnId, ParamId, ParamStore};
pub use shape::{Grad, Shape4};

/// A value on the tape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var(pub usize);

/// An op as the tape keeps it: what its backward pass reads and forms, and that pass.
pub trait TapeOp<B: Backend>: Send + Sync + 'static {
    /// The op's name, for messages.
    fn name(&self) -> &'static str;
    /// The values it reads (tape handles), in order.
    fn inputs(&self) -> &[Var];
    /// The parameters whose gradients its backward pass forms.
    fn params(&self) -> &[ParamId] {
        &[]
    }
    /// A graph input: its value receives a gradient only with `Graph::input_grads`.
    fn is_input(&self) -> bool {
        false
    }
    /// A scalar loss whose gradient is formed in the forward pass (in the node's scratch) and
    /// scaled in backward: as the root, dL/dL = 1 is applied without a buffer.
    fn is_loss(&self) -> bool {
        false
    }
    /// Sends the gradient of the node's value to the op's inputs and parameters.
    fn backward(&self, ctx: BackwardCtx<'_, B>) -> Result<()>;
    /// For finding the ops of one kind on the tape ([`Graph::recorded`]).
    fn as_any(&self) -> &dyn Any;
}

/// A graph input (the batch); nothing to send back.
struct Input;

impl<B: Backend> TapeOp<B> for Input {
    fn name(&self) -> &'static str {
        "input"
    }
    fn inputs(&self) -> &[Var] {
        &[]
    }
    fn is_input(&self) -> bool {
        true
    }
    fn backward(&self, _: BackwardCtx<'_, B>) -> Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A node's state kept between steps for its op (batchnorm's statistics for its backward).
pub type NodeState = Option<Box<dyn Any + Send + Sync>>;

struct Node<B: Backend> {
    op: Box<dyn TapeOp<B>>,
    shape: Shape4,
    value: B::Buffer,
    /// dL/dvalue, made by the first backward pass that forms it (never for a training
    /// step's input).
    grad: Option<B::Buffer>,
    /// Op-specific: dL/dz of a loss, the weights of a weighted sum; only those ops have one.
    scratch: Option<B::Buffer>,
    state: NodeState,
}

/// The buffers of the node an op is computing (forward) or back-propagating (backward).
pub struct NodeBuffers<'a, B: Backend> {
    pub shape: Shape4,
    pub value: &'a mut B::Buffer,
    /// dL/dvalue in backward (None in forward, and for a loss root).
    pub grad: Option<&'a B::Buffer>,
    pub scratch: &'a mut Option<B::Buffer>,
    pub state: &'a mut NodeState,
}

/// `slot` as a buffer of `len` elements, made on first use: a node's gradient and scratch
/// exist only where an op needs them, so the tape holds no empty device buffers.
pub fn sized<'a, B: Backend>(
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

/// The node state of type `S`, made (default) on first use or when the node held another op's.
pub fn state_of<S: Default + Send + Sync + 'static>(state: &mut NodeState) -> Result<&mut S> {
    if !state.as_ref().is_some_and(|s| s.is::<S>()) {
        *state = Some(Box::new(S::default()));
    }
    state
        .as_mut()
        .and_then(|s| s.downcast_mut::<S>())
        .ok_or_else(|| Error::invalid("internal: a node's state of another type"))
}

/// dL/dvalue of the node being back-propagated.
pub fn dy<T>(grad: Option<&T>) -> Result<&T> {
    grad.ok_or_else(|| Error::invalid("internal: no gradient was formed for this value"))
}

/// The scratch buffer an op's forward made (a loss's dL/dz).
pub fn scratch_of<T>(scratch: &Option<T>) -> Result<&T> {
    scratch
        .as_ref()
        .ok_or_else(|| Error::invalid("internal: a loss node without its gradient buffer"))
}

/// Whether the backward pass forms the gradient of a value made by `op`: every op's output
/// does, a graph input only when `input_grads` is on.
fn receives_grad<B: Backend>(input_grads: bool, op: &dyn TapeOp<B>) -> bool {
    input_grads || !op.is_input()
}

/// The values before the node being computed, read-only (forward).
pub struct Values<'a, B: Backend>(&'a [Node<B>]);

impl<B: Backend> Values<'_, B> {
    pub fn value(&self, x: Var) -> &B::Buffer {
        &self.0[x.0].value
    }
    pub fn shape(&self, x: Var) -> Shape4 {
        self.0[x.0].shape
    }
}

/// What an op's forward works with: the backend, the earlier values, the parameters, its own
/// node and the graph's extensions.
pub struct ForwardCtx<'a, B: Backend> {
    pub backend: &'a B,
    pub inputs: Values<'a, B>,
    pub params: &'a mut ParamStore<B>,
    pub node: NodeBuffers<'a, B>,
    pub extensions: &'a Extensions,
}

/// An input's value and shape, and where its gradient goes when it takes one.
pub type InputAndGrad<'a, B> = (
    &'a <B as Backend>::Buffer,
    Shape4,
    Option<Grad<&'a mut <B as Backend>::Buffer>>,
);

/// The values before the node being back-propagated, with their gradients (backward).
pub struct Inputs<'a, B: Backend> {
    nodes: &'a mut [Node<B>],
    ready: &'a mut [bool],
    input_grads: bool,
}

impl<B: Backend> Inputs<'_, B> {
    pub fn value(&self, x: Var) -> &B::Buffer {
        &self.nodes[x.0].value
    }
    pub fn shape(&self, x: Var) -> Shape4 {
        self.nodes[x.0].shape
    }

    /// Whether `x` takes a gradient (not a graph input without `input_grads`).
    pub fn receives_grad(&self, x: Var) -> bool {
        receives_grad(self.input_grads, &*self.nodes[x.0].op)
    }

    /// Where `x`'s gradient goes: written by the first op to reach it, added by later ones
    /// (so a value used twice gets both terms). Marks it as holding one.
    pub fn grad(&mut self, x: Var) -> Result<Grad<&mut B::Buffer>> {
        let accumulate = std::mem::replace(&mut self.ready[x.0], true);
        let buf = self.nodes[x.0]
            .grad
            .as_mut()
            .ok_or_else(|| Error::invalid("internal: an op's input has no gradient buffer"))?;
        Ok(Grad::new(buf, accumulate))
    }

    /// `x`'s value and shape, and where its gradient goes when it takes one (an op whose
    /// backward reads its input, as a convolution's dW does).
    pub fn value_and_grad(&mut self, x: Var) -> Result<InputAndGrad<'_, B>> {
        let takes = self.receives_grad(x);
        let accumulate = takes && std::mem::replace(&mut self.ready[x.0], true);
        let node = &mut self.nodes[x.0];
        let grad = match takes {
            true => Some(Grad::new(
                node.grad.as_mut().ok_or_else(|| {
                    Error::invalid("internal: an op's input has no gradient buffer")
                })?,
                accumulate,
            )),
            false => None,
        };
        Ok((&node.value, node.shape, grad))
    }
}

/// What an op's backward works with: the backend, the earlier values and their gradients, the
/// parameters and its own node (`node.grad` is dL/dvalue; a root has none).
pub struct BackwardCtx<'a, B: Backend> {
    pub backend: &'a B,
    pub inputs: Inputs<'a, B>,
    pub params: &'a mut ParamStore<B>,
    pub node: NodeBuffers<'a, B>,
    pub extensions: &'a Extensions,
    /// The node is the root of the backward pass (dL/dL = 1).
    pub is_root: bool,
}

/// Hooks a layer above registers on a graph, one value per type (an `Arc<dyn ...>` of a hook
/// trait that an op's folder defines); the ops look them up by that type.
#[derive(Default)]
pub struct Extensions(HashMap<TypeId, Box<dyn Any + Send + Sync>>);

impl Extensions {
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Box::new(value));
    }
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.0
            .get(&TypeId::of::<T>())
            .and_then(|b| b.downcast_ref())
    }
}

/// Told each parameter gradient of a backward pass as it becomes final, and asked for the
/// final gradients before the update (a data-parallel group sums them over its ranks: `dist`).
pub trait GradientHook<B: Backend>: Send + Sync {
    /// A backward pass begins over parameter gradients of `lens` floats each (the store's
    /// order).
    fn begin(&self, backend: &B, lens: &[usize]) -> Result<()>;
    /// Parameter `index`'s gradient is final (the tape passed its first use).
    fn ready(&self, backend: &B, index: usize, grad: &B::Buffer) -> Result<()>;
    /// Before the update: every gradient replaced by its final value (the sums).
    fn finish(&self, backend: &B, grads: &mut [&mut B::Buffer]) -> Result<()>;
}

/// A model's parameters, its backend and the tape of the current step.
pub struct Graph<B: Backend> {
    pub backend: B,
    pub params: ParamStore<B>,
    /// Whether inputs receive gradients (off in training: nothing reads them).
    pub input_grads: bool,
    /// Hooks of a layer above (none on one device).
    pub extensions: Extensions,
    nodes: Vec<Node<B>>,
    len: usize,
}

impl<B: Backend> Graph<B> {
    pub fn new(backend: B, params: ParamStore<B>) -> Self {
        Graph {
            backend,
            params,
            input_grads: false,
            extensions: Extensions::default(),
            nodes: Vec::new(),
            len: 0,
        }
    }

    /// Rewinds the tape for a new step; node buffers are kept for reuse.
    pub fn begin(&mut self) {
        self.len = 0;
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

    /// This step's ops in order, with whether each one's value takes a gradient.
    pub fn recorded(&self) -> impl Iterator<Item = &dyn TapeOp<B>> {
        self.nodes[..self.len].iter().map(|n| &*n.op)
    }

    /// Whether `v` takes a gradient in the backward pass.
    pub fn receives_grad(&self, v: Var) -> bool {
        receives_grad(self.input_grads, &*self.nodes[v.0].op)
    }

    /// Appends (or reuses) the next node for `op` with an output of `shape` (buffers reused
    /// when the length agrees); returns its index.
    fn push(&mut self, op: Box<dyn TapeOp<B>>, shape: Shape4) -> Result<usize> {
        let i = self.len;
        if i == self.nodes.len() {
            self.nodes.push(Node {
                op,
                shape,
                value: self.backend.zeros(shape.len())?,
                grad: None,
                scratch: None,
                state: None,
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

    /// Records `op` with an output of `shape`, and runs `forward` to compute its value.
    pub fn record(
        &mut self,
        op: impl TapeOp<B>,
        shape: Shape4,
        forward: impl FnOnce(ForwardCtx<'_, B>) -> Result<()>,
    ) -> Result<Var> {
        let i = self.push(Box::new(op), shape)?;
        let (before, rest) = self.nodes.split_at_mut(i);
        let node = &mut rest[0];
        forward(ForwardCtx {
            backend: &self.backend,
            inputs: Values(before),
            params: &mut self.params,
            node: NodeBuffers {
                shape: node.shape,
                value: &mut node.value,
                grad: None,
                scratch: &mut node.scratch,
                state: &mut node.state,
            },
            extensions: &self.extensions,
        })?;
        Ok(Var(i))
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
        self.record(Input, shape, |ctx| ctx.backend.upload(host, ctx.node.value))
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
        let grad = self.nodes[v.0]
            .grad
            .as_ref()
            .ok_or_else(|| Error::invalid("internal: no gradient was formed for this value"))?;
        self.backend.download_f64(grad)
    }

    /// The gradient hook a layer above registered, if any.
    fn gradient_hook(&self) -> Option<Arc<dyn GradientHook<B>>> {
        self.extensions.get::<Arc<dyn GradientHook<B>>>().cloned()
    }

    /// Back-propagates from the scalar `root` (dL/droot = 1) through this step's tape,
    /// accumulating parameter gradients into `params` (zero them first with
    /// `params.zero_grad`). Node gradients are never cleared: the first op to reach a value
    /// writes its gradient, later ones add (so a value used twice gets both terms).
    pub fn backward(&mut self, root: Var) -> Result<()> {
        let mut ready = vec![false; self.len];
        // A loss root's dL/dL = 1 is applied directly (no upload, so nothing waits on the host).
        let root_is_loss = self.nodes[root.0].op.is_loss();
        for (i, node) in self.nodes[..self.len].iter_mut().enumerate() {
            let is_loss_root = i == root.0 && root_is_loss;
            if receives_grad(self.input_grads, &*node.op) && !is_loss_root {
                sized(&self.backend, &mut node.grad, node.shape.len())?;
            }
        }
        if !root_is_loss {
            let grad = self.nodes[root.0]
                .grad
                .as_mut()
                .ok_or_else(|| Error::invalid("internal: the root has no gradient buffer"))?;
            self.backend.upload_f64(&[1.0], grad)?;
        }
        ready[root.0] = true;
        // The node after whose backward each parameter's gradient is final (its first use on
        // the tape): a data-parallel group starts summing it over the ranks from there,
        // while the rest of the backward pass runs.
        let mut final_at = vec![usize::MAX; self.params.params.len()];
        for (i, node) in self.nodes[..=root.0].iter().enumerate().rev() {
            for p in node.op.params() {
                final_at[p.0] = i;
            }
        }
        let hook = self.gradient_hook();
        if let Some(hook) = &hook {
            let lens: Vec<usize> = self
                .params
                .params
                .iter()
                .map(|p| p.shape.iter().product())
                .collect();
            hook.begin(&self.backend, &lens)?;
        }
        for i in (0..=root.0).rev() {
            if !ready[i] {
                continue; // nothing downstream used this value
            }
            let (before, rest) = self.nodes.split_at_mut(i);
            let Node {
                op,
                shape,
                value,
                grad,
                scratch,
                state,
            } = &mut rest[0];
            op.backward(BackwardCtx {
                backend: &self.backend,
                inputs: Inputs {
                    nodes: before,
                    ready: &mut ready[..i],
                    input_grads: self.input_grads,
                },
                params: &mut self.params,
                node: NodeBuffers {
                    shape: *shape,
                    value,
                    grad: grad.as_ref(),
                    scratch,
                    state,
                },
                extensions: &self.extensions,
                is_root: i == root.0,
            })?;
            if let Some(hook) = &hook {
                for p in op.params() {
                    if final_at[p.0] == i {
                        hook.ready(&self.backend, p.0, &self.params.params[p.0].grad)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Every parameter gradient as the update takes it: the gradient hook's final values (a
    /// data-parallel group's sums over its ranks), or as the backward pass left them.
    pub fn finish_gradients(&mut self) -> Result<()> {
        if let Some(hook) = self.gradient_hook() {
            hook.finish(&self.backend, &mut self.params.grads_mut())?;
        }
        Ok(())
    }
}
