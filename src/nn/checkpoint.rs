//! Checkpoints as safetensors files that PyTorch loads: the model file holds exactly the
//! state_dict of the same PyTorch model (names, shapes, float32, `num_batches_tracked` as a
//! 0-d int64), so `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`
//! takes it. The optimiser file beside it holds `{name}.momentum_buffer` for every parameter
//! and the step in its metadata. Both are written atomically (temporary file, then rename).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};

use super::models::{Model, ModelKind};
use super::optim::Sgd;
use crate::backend::Backend;
use crate::durable::write_atomically;
use crate::error::{Error, Result};
use crate::tape::params::ParamStore;

fn serialize(
    path: &Path,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes = safetensors_bytes(tensors, metadata).map_err(|e| Error::bad_file(path, e))?;
    write_atomically(path, &bytes)
}

/// The safetensors file of `tensors` and `metadata`, laid out the same way every time: tensors
/// by alignment (the widest dtype first, so that every tensor starts aligned to its element
/// size, as the safetensors crate orders them) then by name, and the header's keys sorted.
/// Identical runs so write identical bytes, and checkpoints can be compared by checksum (the
/// crate's own writer keeps the metadata in a HashMap, whose order changes with every process).
fn safetensors_bytes(
    mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    metadata: HashMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let code = |dtype: Dtype| -> std::result::Result<(&'static str, usize), String> {
        Ok(match dtype {
            Dtype::F64 => ("F64", 8),
            Dtype::I64 => ("I64", 8),
            Dtype::F32 => ("F32", 4),
            other => return Err(format!("dtype {other:?} is not written by this crate")),
        })
    };
    for (name, dtype, shape, bytes) in &tensors {
        let elements: usize = shape.iter().product();
        if elements * code(*dtype)?.1 != bytes.len() {
            return Err(format!(
                "tensor {name}: {} bytes for shape {shape:?}",
                bytes.len()
            ));
        }
    }
    tensors.sort_by(|a, b| {
        let (sa, sb) = (code(a.1).map_or(0, |c| c.1), code(b.1).map_or(0, |c| c.1));
        sb.cmp(&sa).then_with(|| a.0.cmp(&b.0))
    });
    // serde_json's Map is a BTreeMap (no preserve_order feature): its keys come out sorted.
    let mut header = serde_json::Map::new();
    let mut metadata: serde_json::Map<String, serde_json::Value> =
        metadata.into_iter().map(|(k, v)| (k, v.into())).collect();
    let mut sum = Fnv1a::new();
    for (_, _, _, bytes) in &tensors {
        sum.update(bytes);
    }
    metadata.insert(CHECKSUM.into(), sum.hex().into());
    header.insert("__metadata__".into(), metadata.into());
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in &tensors {
        let entry = serde_json::json!({
            "dtype": code(*dtype)?.0,
            "shape": shape,
            "data_offsets": [offset, offset + bytes.len()],
        });
        if header.insert(name.clone(), entry).is_some() || name == "__metadata__" {
            return Err(format!("tensor name {name:?} twice or reserved"));
        }
        offset += bytes.len();
    }
    let mut text = serde_json::to_string(&header).map_err(|e| e.to_string())?;
    // The header padded with spaces to a multiple of 8 bytes, as the format's writers do, so
    // that the data (and each 8-byte tensor at its front) starts aligned.
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + offset);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    for (_, _, _, bytes) in &tensors {
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// `values` as float32 bytes, or an error naming `name` when one is not finite: a diverged
/// network is never written into a checkpoint.
fn finite_f32_bytes(name: &str, values: &[f64]) -> Result<Vec<u8>> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::NonFinite(format!(
            "{name}[{i}] = {} is not finite",
            values[i]
        ))),
        None => Ok(f32_bytes(values)),
    }
}

fn f32_bytes(values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| (v as f32).to_le_bytes())
        .collect()
}

/// A tensor as written: name, dtype, shape, little-endian bytes.
type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// The model's state_dict: parameters and batchnorm buffers, as PyTorch names them.
fn model_tensors<B: Backend>(store: &ParamStore<B>, backend: &B) -> Result<Vec<Tensor>> {
    let mut tensors = Vec::new();
    for p in &store.params {
        tensors.push((
            p.name.clone(),
            Dtype::F32,
            p.shape.clone(),
            finite_f32_bytes(&p.name, &backend.download_f64(&p.value)?)?,
        ));
    }
    for bn in &store.bns {
        let c = backend.len(&bn.running_mean);
        tensors.push((
            format!("{}.running_mean", bn.prefix),
            Dtype::F32,
            vec![c],
            finite_f32_bytes(&bn.prefix, &backend.download_f64(&bn.running_mean)?)?,
        ));
        tensors.push((
            format!("{}.running_var", bn.prefix),
            Dtype::F32,
            vec![c],
            finite_f32_bytes(&bn.prefix, &backend.download_f64(&bn.running_var)?)?,
        ));
        tensors.push((
            format!("{}.num_batches_tracked", bn.prefix),
            Dtype::I64,
            vec![],
            bn.num_batches_tracked.to_le_bytes().to_vec(),
        ));
    }
    Ok(tensors)
}

/// Every parameter's momentum buffer, `{name}.momentum_buffer`.
fn optimizer_tensors<B: Backend>(store: &ParamStore<B>, backend: &B) -> Result<Vec<Tensor>> {
    store
        .params
        .iter()
        .map(|p| {
            let name = format!("{}.momentum_buffer", p.name);
            let bytes = finite_f32_bytes(&name, &backend.download_f64(&p.momentum)?)?;
            Ok((name, Dtype::F32, p.shape.clone(), bytes))
        })
        .collect()
}

/// Writes the model's state_dict (parameters and batchnorm buffers) with `metadata`.
pub fn save_model<B: Backend>(
    store: &ParamStore<B>,
    backend: &B,
    path: &Path,
    metadata: HashMap<String, String>,
) -> Result<()> {
    serialize(path, model_tensors(store, backend)?, metadata)
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

/// Tensor `name`'s float32 values, or an error naming the file and the first value that is
/// not finite (this crate never writes one: the file is corrupt, or not a trained network).
fn finite_values(path: &Path, name: &str, bytes: &[u8]) -> Result<Vec<f64>> {
    let values = f32_values(bytes);
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::bad_file(
            path,
            format!(
                "tensor {name}[{i}] = {} is not finite: the file is corrupt or its network diverged",
                values[i]
            ),
        )),
        None => Ok(values),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    crate::files::read_input(path, "checkpoint", crate::files::max_bytes::CHECKPOINT)
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<(SafeTensors<'a>, HashMap<String, String>)> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::bad_file(path, format!("not a safetensors file: {e}")))?;
    let (header_len, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| Error::bad_file(path, e.to_string()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    // Files this crate wrote carry the checksum of their data (older ones and other writers'
    // do not, and are read as they are).
    if let Some(want) = metadata.get(CHECKSUM) {
        let mut sum = Fnv1a::new();
        sum.update(bytes.get(8 + header_len..).unwrap_or_default());
        if sum.hex() != *want {
            return Err(Error::bad_file(
                path,
                format!(
                    "its tensors' checksum is {}, but the file records {want}: the file is corrupt \
                     (a changed or truncated byte); restore it from a copy",
                    sum.hex()
                ),
            ));
        }
    }
    Ok((st, metadata))
}

/// The metadata key of the data's checksum (64-bit FNV-1a of every tensor byte, in file order).
pub const CHECKSUM: &str = "invaspread.data_fnv1a64";

/// 64-bit FNV-1a: a cheap checksum against a changed or truncated byte (not against an
/// adversary, who can rewrite it).
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
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
    restore_model(&st, path, store, backend, &|_| false)?;
    Ok(metadata)
}

/// The model's tensors of `st` into `store`; a tensor that is neither the model's nor
/// `also_expected` is an error (another model's checkpoint).
fn restore_model<B: Backend>(
    st: &SafeTensors<'_>,
    path: &Path,
    store: &mut ParamStore<B>,
    backend: &B,
    also_expected: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let mut expected: Vec<String> = store.params.iter().map(|p| p.name.clone()).collect();
    for bn in &store.bns {
        for suffix in ["running_mean", "running_var", "num_batches_tracked"] {
            expected.push(format!("{}.{suffix}", bn.prefix));
        }
    }
    if let Some(extra) = st
        .names()
        .into_iter()
        .find(|n| !expected.iter().any(|e| e == n) && !also_expected(n))
    {
        let hint = if extra.ends_with(".momentum_buffer") {
            "this is a run's state or optimizer file, not a model checkpoint: give the run's last.safetensors or best.safetensors"
        } else {
            "is this checkpoint from another model?"
        };
        return Err(Error::bad_file(
            path,
            format!("unexpected tensor {extra} ({hint})"),
        ));
    }
    for p in &mut store.params {
        let data = expect(st, path, &p.name, Dtype::F32, &p.shape)?;
        backend.upload_f64(&finite_values(path, &p.name, data)?, &mut p.value)?;
    }
    for bn in &mut store.bns {
        let c = backend.len(&bn.running_mean);
        for (suffix, buffer) in [
            ("running_mean", &mut bn.running_mean),
            ("running_var", &mut bn.running_var),
        ] {
            let name = format!("{}.{suffix}", bn.prefix);
            let data = expect(st, path, &name, Dtype::F32, &[c])?;
            backend.upload_f64(&finite_values(path, &name, data)?, buffer)?;
        }
        let count = expect(
            st,
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
    Ok(())
}

/// Writes every parameter's momentum buffer and the optimiser's step.
pub fn save_optimizer<B: Backend>(
    store: &ParamStore<B>,
    sgd: &Sgd,
    backend: &B,
    path: &Path,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    metadata.insert("step".into(), sgd.step.to_string());
    serialize(path, optimizer_tensors(store, backend)?, metadata)
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
    restore_optimizer(&st, path, store, backend)?;
    sgd.step = integer(path, &metadata, "step")?;
    Ok(metadata)
}

fn restore_optimizer<B: Backend>(
    st: &SafeTensors<'_>,
    path: &Path,
    store: &mut ParamStore<B>,
    backend: &B,
) -> Result<()> {
    for p in &mut store.params {
        let name = format!("{}.momentum_buffer", p.name);
        let data = expect(st, path, &name, Dtype::F32, &p.shape)?;
        backend.upload_f64(&finite_values(path, &name, data)?, &mut p.momentum)?;
    }
    Ok(())
}

/// A model checkpoint of any architecture: the model its metadata names, built on `backend`
/// with the file's values (every name, shape and dtype checked), and the metadata. For `eval`,
/// `embed` and `step`, which take the model from the file.
pub fn load_any_model<B: Backend>(
    path: &Path,
    backend: &B,
) -> Result<(ParamStore<B>, Model, HashMap<String, String>)> {
    let bytes = read(path)?;
    let (st, meta) = parse(path, &bytes)?;
    let name = meta
        .get("model")
        .ok_or_else(|| Error::bad_file(path, "metadata names no model"))?;
    let kind: ModelKind =
        crate::names::parse("metadata model", name).map_err(|e| e.in_file(path))?;
    let mut store = ParamStore::default();
    let model = Model::new(kind, &mut store, backend, 0)?;
    restore_model(&st, path, &mut store, backend, &|_| false)?;
    Ok((store, model, meta))
}

/// The image size a checkpoint's run trained at (its metadata `image_size`), held to the
/// range of `--image-size`: a file's metadata is input like a flag (0 would divide by zero,
/// 100000 allocate terabytes). None when the file does not say.
pub fn image_size(path: &Path, meta: &HashMap<String, String>) -> Result<Option<usize>> {
    let Some(text) = meta.get("image_size") else {
        return Ok(None);
    };
    let range = &crate::limits::IMAGE_SIZE;
    match text.parse::<u64>() {
        Ok(s) if range.check(s).is_ok() => Ok(Some(s as usize)),
        _ => Err(Error::bad_file(
            path,
            format!(
                "metadata image_size = {text:?} is out of range: expected {} (or give --image-size)",
                range.describe()
            ),
        )),
    }
}

/// The seed of a checkpoint's run (metadata `seed`, 0 when absent): the synthetic dataset is
/// generated from it.
pub fn seed(path: &Path, meta: &HashMap<String, String>) -> Result<u64> {
    meta.get("seed").map_or(Ok(0), |v| {
        v.parse::<u64>().map_err(|_| {
            Error::bad_file(
                path,
                format!(
                    "metadata seed = {v:?} is not a number: expected an integer from 0 to 2^64 - 1"
                ),
            )
        })
    })
}

/// An integer field of a file's metadata, or an error naming the file and the field.
pub fn integer<T: std::str::FromStr>(
    path: &Path,
    meta: &HashMap<String, String>,
    key: &str,
) -> Result<T> {
    meta.get(key)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::bad_file(path, format!("metadata has no integer '{key}'")))
}

/// The state of a run in one file, written in one atomic rename: the model, every momentum
/// buffer, every step's loss so far (`run.step_losses`, float64) and `metadata` (the run's
/// position, its metrics history), with the optimiser's step as `sgd_step`. A run resumes from
/// this file alone, so a crash can never pair a model with another step's optimizer.
#[allow(clippy::too_many_arguments)] // the model, the optimizers, the losses and the file
pub fn save_run_state<B: Backend>(
    store: &ParamStore<B>,
    sgd: &Sgd,
    backend: &B,
    step_losses: &[f64],
    extra: &[(String, Vec<usize>, Vec<f32>)],
    path: &Path,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let mut tensors = model_tensors(store, backend)?;
    tensors.extend(optimizer_tensors(store, backend)?);
    for (name, shape, values) in extra {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((name.clone(), Dtype::F32, shape.clone(), bytes));
    }
    let losses: Vec<u8> = step_losses.iter().flat_map(|l| l.to_le_bytes()).collect();
    tensors.push((
        STEP_LOSSES.into(),
        Dtype::F64,
        vec![step_losses.len()],
        losses,
    ));
    metadata.insert("sgd_step".into(), sgd.step.to_string());
    serialize(path, tensors, metadata)
}

const STEP_LOSSES: &str = "run.step_losses";

/// The prefix of the extra tensors a run state may hold (a baseline's state, `methods`).
pub const EXTRA: &str = "method.";

/// A tensor's shape and float32 values.
pub type ShapedValues = (Vec<usize>, Vec<f32>);

/// The float32 tensors of a run state whose names start with [`EXTRA`]: name -> (shape,
/// values).
pub fn load_extra_tensors(path: &Path) -> Result<HashMap<String, ShapedValues>> {
    let bytes = read(path)?;
    let (st, _) = parse(path, &bytes)?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if !name.starts_with(EXTRA) {
            continue;
        }
        if view.dtype() != Dtype::F32 {
            return Err(Error::bad_file(path, format!("{name} is not float32")));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// Loads what [`save_run_state`] wrote into `store` and `sgd`; returns its metadata and the
/// step losses.
pub fn load_run_state<B: Backend>(
    store: &mut ParamStore<B>,
    sgd: &mut Sgd,
    backend: &B,
    path: &Path,
) -> Result<(HashMap<String, String>, Vec<f64>)> {
    let bytes = read(path)?;
    let (st, metadata) = parse(path, &bytes)?;
    let run_tensor =
        |n: &str| n == STEP_LOSSES || n.ends_with(".momentum_buffer") || n.starts_with(EXTRA);
    restore_model(&st, path, store, backend, &run_tensor)?;
    restore_optimizer(&st, path, store, backend)?;
    sgd.step = integer(path, &metadata, "sgd_step")?;
    let view = st
        .tensor(STEP_LOSSES)
        .map_err(|_| Error::bad_file(path, format!("missing tensor {STEP_LOSSES}")))?;
    if view.dtype() != Dtype::F64 || view.shape().len() != 1 {
        return Err(Error::bad_file(
            path,
            format!("{STEP_LOSSES} is not a float64 vector"),
        ));
    }
    let losses = view
        .data()
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    Ok((metadata, losses))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_contents_give_identical_bytes_that_the_safetensors_crate_reads() {
        let tensors = || {
            vec![
                (
                    "b.weight".to_string(),
                    Dtype::F32,
                    vec![2, 3],
                    f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                ),
                (
                    "a.count".to_string(),
                    Dtype::I64,
                    vec![],
                    7i64.to_le_bytes().to_vec(),
                ),
                (
                    "a.bias".to_string(),
                    Dtype::F32,
                    vec![3],
                    f32_bytes(&[0.5, -0.5, 0.25]),
                ),
            ]
        };
        // Metadata maps built in different insertion orders (and so iteration orders).
        let meta_a: HashMap<String, String> =
            (0..20).map(|i| (format!("k{i}"), i.to_string())).collect();
        let meta_b: HashMap<String, String> = (0..20)
            .rev()
            .map(|i| (format!("k{i}"), i.to_string()))
            .collect();
        let a = safetensors_bytes(tensors(), meta_a).unwrap();
        let b = safetensors_bytes(tensors().into_iter().rev().collect(), meta_b).unwrap();
        assert_eq!(a, b);
        let header_len = u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let st = SafeTensors::deserialize(&a).unwrap();
        let count = st.tensor("a.count").unwrap();
        assert_eq!((count.dtype(), count.shape()), (Dtype::I64, &[][..]));
        assert_eq!(count.data(), 7i64.to_le_bytes());
        let w = st.tensor("b.weight").unwrap();
        assert_eq!(w.shape(), &[2, 3]);
        assert_eq!(
            w.data(),
            f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).as_slice()
        );
        let (_, meta) = SafeTensors::read_metadata(&a).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["k7"], "7");
        // A size that does not match the shape is refused, not written.
        let bad = vec![("x".to_string(), Dtype::F32, vec![4], vec![0u8; 12])];
        assert!(safetensors_bytes(bad, HashMap::new()).is_err());
    }
}
