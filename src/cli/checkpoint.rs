//! Building the model a checkpoint names, for `eval`, `embed` and `step`.

use std::collections::HashMap;
use std::path::Path;

use invaspread::nn::checkpoint;
use invaspread::nn::models::{Model, ModelKind};
use invaspread::nn::Encoder;
use invaspread::tape::params::ParamStore;
use invaspread::tape::Graph;
use invaspread::{names, Error};

/// The model a checkpoint names, on `backend`, with the checkpoint's values.
pub fn load<B: Encoder>(path: &Path, backend: B) -> invaspread::Result<(Graph<B>, Model)> {
    let (graph, model, _) = load_with_metadata(path, backend)?;
    Ok((graph, model))
}

/// [`load`], with the checkpoint's metadata (model, dataset, image_size, seed, step).
pub fn load_with_metadata<B: Encoder>(
    path: &Path,
    backend: B,
) -> invaspread::Result<(Graph<B>, Model, HashMap<String, String>)> {
    let bytes = invaspread::files::read_input(
        path,
        "checkpoint",
        invaspread::files::max_bytes::CHECKPOINT,
    )?;
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
    Ok((Graph::new(backend, store), model, meta))
}

/// The dataset `args` names, as the checkpoint's run saw it: generated with the run's seed
/// (the synthetic set depends on it) and resized to the run's image size unless
/// `--image-size` says otherwise; restricted to `--classes` when given.
pub fn dataset_for(
    args: &super::data::DataArgs,
    meta: &HashMap<String, String>,
    path: &Path,
) -> invaspread::Result<invaspread::data::Dataset> {
    let number = |key: &str| -> invaspread::Result<Option<u64>> {
        meta.get(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    Error::bad_file(path, format!("metadata {key} = {v:?} is not a number"))
                })
            })
            .transpose()
    };
    let mut cfg = args.config();
    if cfg.image_size.is_none() {
        // The flag's range: a checkpoint's metadata is input like a flag (0 would divide by
        // zero, 100000 allocate terabytes).
        cfg.image_size = number("image_size")?
            .map(|s| {
                let range = &invaspread::limits::IMAGE_SIZE;
                range.check(s).map_err(|_| {
                    Error::bad_file(
                        path,
                        format!(
                            "metadata image_size = {s} is out of range: expected {} (or give --image-size)",
                            range.describe()
                        ),
                    )
                })
            })
            .transpose()?
            .map(|s| s as usize);
    }
    let seed = number("seed")?.unwrap_or(0);
    let ds = super::data::load(&cfg, seed)?;
    match &cfg.classes {
        Some(spec) => {
            let picked = invaspread::data::classes::select(spec, &ds.classes, "--classes")?;
            let ds = ds.restrict(&picked, "--classes")?;
            eprintln!(
                "using {} classes ({}): {} train and {} test images",
                ds.classes.len(),
                ds.classes.join(", "),
                ds.train.len(),
                ds.test.len()
            );
            Ok(ds)
        }
        None => Ok(ds),
    }
}
