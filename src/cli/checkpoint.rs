//! Building the model a checkpoint names, for `eval`, `embed` and `step`.

use std::collections::HashMap;
use std::path::Path;

use invaspread::nn::backend::Backend;
use invaspread::nn::checkpoint;
use invaspread::nn::graph::Graph;
use invaspread::nn::models::{Model, ModelKind};
use invaspread::nn::params::ParamStore;
use invaspread::{names, Error};

/// The model a checkpoint names, on `backend`, with the checkpoint's values.
pub fn load<B: Backend>(path: &Path, backend: B) -> invaspread::Result<(Graph<B>, Model)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::bad_file(path, format!("not a safetensors file: {e}")))?;
    let meta: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
    let name = meta
        .get("model")
        .ok_or_else(|| Error::bad_file(path, "metadata names no model"))?;
    let kind: ModelKind = names::parse("metadata model", name).map_err(|e| e.in_file(path))?;
    let mut store = ParamStore::default();
    let model = Model::new(kind, &mut store, &backend, 0)?;
    checkpoint::load_model(&mut store, &backend, path)?;
    Ok((Graph::new(backend, store), model))
}
