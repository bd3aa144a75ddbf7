//! Named parameters and batchnorm buffers, with PyTorch's names and default initialisation.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::backend::Backend;
use crate::error::Result;

/// A handle to a trainable parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamId(pub usize);

/// A handle to a batchnorm layer's running statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BnId(pub usize);

/// One trainable tensor: its value, gradient and SGD momentum buffer.
pub struct Param<B: Backend> {
    /// The state_dict name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub value: B::Buffer,
    pub grad: B::Buffer,
    pub momentum: B::Buffer,
}

/// A batchnorm layer's buffers: `{prefix}.running_mean`, `.running_var`, `.num_batches_tracked`.
pub struct BnBuffers<B: Backend> {
    pub prefix: String,
    pub running_mean: B::Buffer,
    pub running_var: B::Buffer,
    pub num_batches_tracked: i64,
}

/// Two different parameters of `params`, both mutable (a layer's weight and bias); a free
/// function so that the store's batchnorm buffers stay borrowable beside them.
pub fn pair_mut<B: Backend>(
    params: &mut [Param<B>],
    a: ParamId,
    b: ParamId,
) -> (&mut Param<B>, &mut Param<B>) {
    assert_ne!(a, b, "pair_mut needs two different parameters");
    if a.0 < b.0 {
        let (lo, hi) = params.split_at_mut(b.0);
        (&mut lo[a.0], &mut hi[0])
    } else {
        let (lo, hi) = params.split_at_mut(a.0);
        (&mut hi[0], &mut lo[b.0])
    }
}

/// Every parameter and buffer of a model, in registration order.
pub struct ParamStore<B: Backend> {
    pub params: Vec<Param<B>>,
    pub bns: Vec<BnBuffers<B>>,
}

impl<B: Backend> Default for ParamStore<B> {
    fn default() -> Self {
        ParamStore {
            params: Vec::new(),
            bns: Vec::new(),
        }
    }
}

impl<B: Backend> ParamStore<B> {
    /// Registers a parameter initialised U(-bound, bound) (bound = 0 gives zeros).
    pub fn add_uniform(
        &mut self,
        backend: &B,
        name: String,
        shape: Vec<usize>,
        bound: f64,
        rng: &mut ChaCha8Rng,
    ) -> Result<ParamId> {
        let len: usize = shape.iter().product();
        let host: Vec<f64> = (0..len)
            .map(|_| {
                if bound > 0.0 {
                    rng.random_range(-bound..bound)
                } else {
                    0.0
                }
            })
            .collect();
        self.add_values(backend, name, shape, &host)
    }

    /// Registers a parameter with the given values.
    pub fn add_values(
        &mut self,
        backend: &B,
        name: String,
        shape: Vec<usize>,
        values: &[f64],
    ) -> Result<ParamId> {
        let mut value = backend.zeros(values.len())?;
        backend.upload_f64(values, &mut value)?;
        self.params.push(Param {
            name,
            shape,
            value,
            grad: backend.zeros(values.len())?,
            momentum: backend.zeros(values.len())?,
        });
        Ok(ParamId(self.params.len() - 1))
    }

    /// Registers a batchnorm layer `prefix` with `c` channels: weight 1, bias 0, running
    /// mean 0, running variance 1 (PyTorch's defaults). Returns (bn, weight, bias).
    pub fn add_batchnorm(
        &mut self,
        backend: &B,
        prefix: &str,
        c: usize,
    ) -> Result<(BnId, ParamId, ParamId)> {
        let gamma = self.add_values(backend, format!("{prefix}.weight"), vec![c], &vec![1.0; c])?;
        let beta = self.add_values(backend, format!("{prefix}.bias"), vec![c], &vec![0.0; c])?;
        let mut running_var = backend.zeros(c)?;
        backend.upload_f64(&vec![1.0; c], &mut running_var)?;
        self.bns.push(BnBuffers {
            prefix: prefix.to_string(),
            running_mean: backend.zeros(c)?,
            running_var,
            num_batches_tracked: 0,
        });
        Ok((BnId(self.bns.len() - 1), gamma, beta))
    }

    pub fn param(&self, id: ParamId) -> &Param<B> {
        &self.params[id.0]
    }

    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.params.iter().position(|p| p.name == name).map(ParamId)
    }

    /// Zeroes every gradient (before a backward pass).
    pub fn zero_grad(&mut self, backend: &B) -> Result<()> {
        for p in &mut self.params {
            let len = backend.len(&p.value);
            backend.reset(&mut p.grad, len)?;
        }
        Ok(())
    }

    /// Every parameter's gradient, in order.
    pub fn grads_mut(&mut self) -> Vec<&mut B::Buffer> {
        self.params.iter_mut().map(|p| &mut p.grad).collect()
    }

    /// The number of trainable scalars.
    pub fn count(&self, backend: &B) -> usize {
        self.params.iter().map(|p| backend.len(&p.value)).sum()
    }
}
