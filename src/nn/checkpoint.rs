//! Checkpoints as safetensors files that PyTorch loads: the model file holds exactly the
//! state_dict of the same PyTorch model (names, shapes, float32, `num_batches_tracked` as a
//! 0-d int64), so `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`
//! takes it. The optimiser file beside it holds `{name}.momentum_buffer` for every parameter
//! and the step in its metadata. Both are written atomically (temporary file, then rename).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::backend::Backend;
use super::optim::Sgd;
use super::params::ParamStore;
use crate::error::{Error, Result};
use crate::npy::write_atomically;

fn serialize(
    path: &Path,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::invalid(format!("tensor {name}: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::bad_file(path, e.to_string()))?;
    write_atomically(path, &bytes)
}

fn f32_bytes(values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| (v as f32).to_le_bytes())
        .collect()
}

/// Writes the model's state_dict (parameters and batchnorm buffers) with `metadata`.
pub fn save_model<B: Backend>(
    store: &ParamStore<B>,
    backend: &B,
    path: &Path,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut tensors = Vec::new();
    for p in &store.params {
        tensors.push((
            p.name.clone(),
            Dtype::F32,
            p.shape.clone(),
            f32_bytes(&backend.download_f64(&p.value)?),
        ));
    }
    for bn in &store.bns {
        let c = backend.len(&bn.running_mean);
        tensors.push((
            format!("{}.running_mean", bn.prefix),
            Dtype::F32,
            vec![c],
            f32_bytes(&backend.download_f64(&bn.running_mean)?),
        ));
        tensors.push((
            format!("{}.running_var", bn.prefix),
            Dtype::F32,
            vec![c],
            f32_bytes(&backend.download_f64(&bn.running_var)?),
        ));
        tensors.push((
            format!("{}.num_batches_tracked", bn.prefix),
            Dtype::I64,
            vec![],
            bn.num_batches_tracked.to_le_bytes().to_vec(),
        ));
    }
    serialize(path, tensors, metadata)
}

/// Reads the file and checks one tensor's dtype and shape; returns its raw bytes.
fn expect<'a>(
    st: &'a SafeTensors<'a>,
    path: &Path,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8]> {
    let view = st
        .tensor(name)
        .map_err(|_| Error::bad_file(path, format!("missing tensor {name}")))?;
    if view.dtype() != dtype {
        return Err(Error::bad_file(
            path,
            format!(
                "tensor {name} has dtype {:?}, expected {dtype:?}",
                view.dtype()
            ),
        ));
    }
    if view.shape() != shape {
        return Err(Error::bad_file(
            path,
            format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                view.shape()
            ),
        ));
    }
    Ok(view.data())
}

fn f32_values(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<(SafeTensors<'a>, HashMap<String, String>)> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::bad_file(path, format!("not a safetensors file: {e}")))?;
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| Error::bad_file(path, e.to_string()))?;
    Ok((st, meta.metadata().clone().unwrap_or_default()))
}

/// Loads a model file into `store`, which must have the same architecture: every name,
/// shape and dtype is checked, and a missing or unexpected tensor is an error naming it.
/// Returns the file's metadata.
pub fn load_model<B: Backend>(
    store: &mut ParamStore<B>,
    backend: &B,
    path: &Path,
) -> Result<HashMap<String, String>> {
    let bytes = read(path)?;
    let (st, metadata) = parse(path, &bytes)?;
    let mut expected: Vec<String> = store.params.iter().map(|p| p.name.clone()).collect();
    for bn in &store.bns {
        for suffix in ["running_mean", "running_var", "num_batches_tracked"] {
            expected.push(format!("{}.{suffix}", bn.prefix));
        }
    }
    if let Some(extra) = st
        .names()
        .into_iter()
        .find(|n| !expected.iter().any(|e| e == n))
    {
        return Err(Error::bad_file(
            path,
            format!("unexpected tensor {extra} (is this checkpoint from another model?)"),
        ));
    }
    for p in &mut store.params {
        let data = expect(&st, path, &p.name, Dtype::F32, &p.shape)?;
        backend.upload_f64(&f32_values(data), &mut p.value)?;
    }
    for bn in &mut store.bns {
        let c = backend.len(&bn.running_mean);
        let mean = expect(
            &st,
            path,
            &format!("{}.running_mean", bn.prefix),
            Dtype::F32,
            &[c],
        )?;
        backend.upload_f64(&f32_values(mean), &mut bn.running_mean)?;
        let var = expect(
            &st,
            path,
            &format!("{}.running_var", bn.prefix),
            Dtype::F32,
            &[c],
        )?;
        backend.upload_f64(&f32_values(var), &mut bn.running_var)?;
        let count = expect(
            &st,
            path,
            &format!("{}.num_batches_tracked", bn.prefix),
            Dtype::I64,
            &[],
        )?;
        bn.num_batches_tracked = i64::from_le_bytes(
            count
                .try_into()
                .map_err(|_| Error::bad_file(path, "num_batches_tracked is not 8 bytes"))?,
        );
    }
    Ok(metadata)
}

/// Writes every parameter's momentum buffer and the optimiser's step.
pub fn save_optimizer<B: Backend>(
    store: &ParamStore<B>,
    sgd: &Sgd,
    backend: &B,
    path: &Path,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let mut tensors = Vec::new();
    for p in &store.params {
        tensors.push((
            format!("{}.momentum_buffer", p.name),
            Dtype::F32,
            p.shape.clone(),
            f32_bytes(&backend.download_f64(&p.momentum)?),
        ));
    }
    metadata.insert("step".into(), sgd.step.to_string());
    serialize(path, tensors, metadata)
}

/// Loads momentum buffers and the step saved by [`save_optimizer`]; returns the metadata.
pub fn load_optimizer<B: Backend>(
    store: &mut ParamStore<B>,
    sgd: &mut Sgd,
    backend: &B,
    path: &Path,
) -> Result<HashMap<String, String>> {
    let bytes = read(path)?;
    let (st, metadata) = parse(path, &bytes)?;
    for p in &mut store.params {
        let data = expect(
            &st,
            path,
            &format!("{}.momentum_buffer", p.name),
            Dtype::F32,
            &p.shape,
        )?;
        backend.upload_f64(&f32_values(data), &mut p.momentum)?;
    }
    sgd.step = metadata
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::bad_file(path, "metadata has no integer 'step'"))?;
    Ok(metadata)
}
