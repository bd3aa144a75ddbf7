//! Building the model a checkpoint names, for `eval`, `embed` and `step`.

use std::collections::HashMap;
use std::path::Path;

use invaspread::nn::checkpoint;
use invaspread::nn::models::Model;
use invaspread::nn::Encoder;
use invaspread::tape::Graph;

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
    let (store, model, meta) = checkpoint::load_any_model(path, &backend)?;
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
    let mut cfg = args.config();
    if cfg.image_size.is_none() {
        cfg.image_size = checkpoint::image_size(path, meta)?;
    }
    let seed = checkpoint::seed(path, meta)?;
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
