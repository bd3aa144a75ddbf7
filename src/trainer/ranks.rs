//! Data-parallel runs: `invaspread launch --gpus N -- train ...`, or any launcher that sets
//! torchrun's variables (`dist::DistEnv`). Every rank is one process with one GPU, and the run
//! is one device's run of the same global batch (exactly so with `--sync-bn`):
//!
//! - Joining ([`join`]): the rendezvous compares every rank's configuration and dataset size, so
//!   ranks that would compute different things never start.
//! - Data: step i's global batch is one device's (`epoch_order`, `--batch` images); rank r takes
//!   its images r m .. (r + 1) m (m = batch / ranks) and augments them as one device would
//!   (augmentation is seeded per image, not per position), see [`shard`].
//! - Rank 0 alone writes (`--out`, its lock, config.json, checkpoints, metrics, steps.csv) and
//!   reads the state on `--resume`; [`share_state`] hands the others its parameters, momentum,
//!   BatchNorm statistics and position before the first step.
//! - Stops: a signal on any rank stops every rank after the same step. The ranks agree at every
//!   loss read ([`any_rank`]: the host waits for the device there anyway), so a stop takes
//!   effect within `loss_read_every` steps.
//! - Evaluation ([`embed_split_shared`]): each rank embeds its share of the bank and of the
//!   queries; the shares are all-gathered, and every rank runs the same neighbour search. With
//!   BatchNorm per rank, rank 0's running statistics are the run's (broadcast before each
//!   evaluation, as DDP's `broadcast_buffers`), so every rank embeds with the same network.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use super::{RunOptions, TrainConfig};
use crate::backend::Backend;
use crate::cuda::Gpu;
use crate::data::{Dataset, Split};
use crate::dist::collectives::Collectives;
use crate::dist::data_parallel::DataParallel;
use crate::dist::gradient_buckets::cap_floats;
use crate::dist::nccl::ProcessGroup;
use crate::error::{Error, Result};
use crate::nn::embed::{embed_range_until, embed_split_until, EVAL_BATCH};
use crate::nn::models::{Model, EMBED_DIM};
use crate::nn::Encoder;
use crate::tape::params::ParamStore;
use crate::tape::Graph;

/// How long a rank waits for the others (the rendezvous, then every collective) before it
/// stops with an error naming the missing rank: `INVASPREAD_DIST_TIMEOUT_S`, default 600 s
/// (PyTorch's NCCL default). Rank 0's checkpoint writes and a resume's load happen while the
/// others wait, so it must exceed them.
pub fn timeout() -> Result<Duration> {
    const VAR: &str = "INVASPREAD_DIST_TIMEOUT_S";
    match std::env::var(VAR) {
        Err(_) => Ok(Duration::from_secs(600)),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(s) if (1..=86_400).contains(&s) => Ok(Duration::from_secs(s)),
            _ => Err(Error::invalid(format!(
                "{VAR}={v:?}: expected whole seconds from 1 to 86400"
            ))),
        },
    }
}

/// " on rank r of R (sync-bn)" for the first line of a data-parallel run; empty for one.
pub fn describe(cfg: &TrainConfig, opts: &RunOptions) -> String {
    match &opts.group {
        Some(env) if cfg.ranks > 1 => format!(
            ", rank {} of {}, BatchNorm {}, gradients summed in buckets of {} MiB",
            env.rank,
            env.world_size,
            if cfg.sync_bn {
                "over the global batch (--sync-bn)"
            } else {
                "per rank"
            },
            opts.bucket_mb
        ),
        _ => String::new(),
    }
}

/// Joins the group of `opts.group` on `gpu` when the run has several ranks: the rendezvous
/// checks that every rank has the same configuration and dataset.
pub fn join(
    cfg: &TrainConfig,
    opts: &RunOptions,
    ds: &Dataset,
    gpu: &Arc<Gpu>,
) -> Result<Option<DataParallel>> {
    let env = match &opts.group {
        Some(env) if env.world_size > 1 || cfg.ranks > 1 => env,
        _ => return Ok(None),
    };
    if env.world_size != cfg.ranks {
        return Err(Error::invalid(format!(
            "WORLD_SIZE={} but the run's configuration has {} ranks: a run keeps its number of \
             ranks (resume it with the same launcher settings)",
            env.world_size, cfg.ranks
        )));
    }
    let group = ProcessGroup::join(gpu, env, rendezvous_config(cfg, ds)?, timeout()?)?;
    let buckets = cap_floats(opts.bucket_mb)?;
    Ok(Some(
        DataParallel::new(group)
            .with_sync_bn(cfg.sync_bn)
            .with_bucket_floats(buckets),
    ))
}

/// What every rank must agree on: the configuration (less what a run records, and the data
/// folder, whose path may differ between machines) and the dataset's size and classes.
fn rendezvous_config(cfg: &TrainConfig, ds: &Dataset) -> Result<Vec<u8>> {
    let mut same = cfg.clone();
    same.recorded = None;
    same.data.data_dir = None;
    let mut value = serde_json::to_value(&same)
        .map_err(|e| Error::invalid(format!("the configuration as JSON: {e}")))?;
    if let Some(fields) = value.as_object_mut() {
        fields.insert(
            "dataset_images".into(),
            serde_json::json!({"train": ds.training_len(), "test": ds.test.len(),
                               "classes": ds.classes}),
        );
    }
    serde_json::to_vec(&value).map_err(|e| Error::invalid(format!("the configuration: {e}")))
}

/// The images of a global batch `batch` that rank `rank` of `ranks` takes (positions in the
/// batch): m = batch / ranks of them, in rank order.
pub fn shard(batch: usize, (rank, ranks): (usize, usize)) -> Range<usize> {
    let m = batch / ranks;
    rank * m..(rank + 1) * m
}

/// Rank 0's values of `values` on every rank. Each value travels as four 16-bit pieces, each a
/// float holding a whole number (exact), so no bit pattern depends on how floats are copied.
pub fn broadcast_u64<B: Backend>(
    group: &dyn Collectives<B>,
    backend: &B,
    values: &mut [u64],
) -> Result<()> {
    let pieces: Vec<f32> = values
        .iter()
        .flat_map(|v| (0..4).map(move |i| ((v >> (16 * i)) & 0xffff) as f32))
        .collect();
    let mut buf = backend.zeros(pieces.len())?;
    backend.upload(&pieces, &mut buf)?;
    group.broadcast(backend, &mut [&mut buf])?;
    let back = backend.download(&buf)?;
    for (v, p) in values.iter_mut().zip(back.chunks_exact(4)) {
        *v = p
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &x)| acc | ((x as u64) << (16 * i)));
    }
    Ok(())
}

/// Whether `flag` holds on any rank (every rank gets the same answer); `flag` on one device.
pub fn any_rank<B: Backend>(group: &dyn Collectives<B>, backend: &B, flag: bool) -> Result<bool> {
    if group.world_size() == 1 {
        return Ok(flag);
    }
    let mut own = backend.zeros(1)?;
    backend.upload(&[f32::from(u8::from(flag))], &mut own)?;
    let mut all = backend.zeros(group.world_size())?;
    group.all_gather(backend, &own, &mut all)?;
    Ok(backend.download(&all)?.iter().any(|&f| f != 0.0))
}

/// Rank 0's BatchNorm running statistics on every rank.
pub fn share_bn_statistics<B: Backend>(
    group: &dyn Collectives<B>,
    backend: &B,
    store: &mut ParamStore<B>,
) -> Result<()> {
    let mut bufs: Vec<&mut B::Buffer> = store
        .bns
        .iter_mut()
        .flat_map(|bn| [&mut bn.running_mean, &mut bn.running_var])
        .collect();
    group.broadcast(backend, &mut bufs)
}

/// Rank 0's parameters, momentum and BatchNorm statistics on every rank (its initialisation,
/// or the state it resumed).
pub fn share_state<B: Backend>(
    group: &dyn Collectives<B>,
    backend: &B,
    store: &mut ParamStore<B>,
) -> Result<()> {
    let mut bufs: Vec<&mut B::Buffer> = store
        .params
        .iter_mut()
        .flat_map(|p| [&mut p.value, &mut p.momentum])
        .collect();
    group.broadcast(backend, &mut bufs)?;
    share_bn_statistics(group, backend, store)
}

/// The split's L2-normalized embeddings (N x 128) on every rank, each rank embedding its
/// share (ceil(N / ranks) images in rank order, the last share shorter); on one device, all of
/// them. None when `stop()` held between batches (one device only: a group's ranks must not
/// stop apart).
pub fn embed_split_shared<B: Encoder>(
    group: &dyn Collectives<B>,
    graph: &mut Graph<B>,
    model: &Model,
    split: &Split,
    size: usize,
    stop: &dyn Fn() -> bool,
) -> Result<Option<B::Buffer>> {
    let (rank, ranks) = (group.rank(), group.world_size());
    if ranks == 1 {
        return embed_split_until(graph, model, split, size, EVAL_BATCH, stop);
    }
    let n = split.len();
    let share = n.div_ceil(ranks);
    let own = (rank * share).min(n)..((rank + 1) * share).min(n);
    let never = || false;
    let mut padded = graph.backend.zeros(share * EMBED_DIM)?;
    if !own.is_empty() {
        let f = embed_range_until(graph, model, split, size, own, EVAL_BATCH, &never)?
            .ok_or_else(|| Error::invalid("internal: an embedding pass stopped unasked"))?;
        graph.backend.copy_into(&f, &mut padded, 0)?;
    }
    let b = &graph.backend;
    let mut all = b.zeros(ranks * share * EMBED_DIM)?;
    group.all_gather(b, &padded, &mut all)?;
    if ranks * share == n {
        return Ok(Some(all));
    }
    // Every share but the last non-empty one is full, so the n rows are the gathered prefix.
    let mut out = b.zeros(n * EMBED_DIM)?;
    b.copy_prefix(&all, &mut out)?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_of_a_global_batch_cover_it_in_rank_order() {
        let parts: Vec<Range<usize>> = (0..3).map(|r| shard(12, (r, 3))).collect();
        assert_eq!(parts, vec![0..4, 4..8, 8..12]);
        assert_eq!(shard(8, (0, 1)), 0..8);
    }

    #[test]
    fn u64_values_survive_their_float_pieces_on_one_device() {
        let b = crate::backend::Cpu::<f32>::new();
        let one = crate::dist::collectives::SingleDevice;
        let mut v = [0, 1, u64::MAX, 0x7fc0_0001_ff80_0001, 123_456_789_012];
        let want = v;
        broadcast_u64(&one, &b, &mut v).unwrap();
        assert_eq!(v, want);
        assert!(any_rank(&one, &b, true).unwrap() && !any_rank(&one, &b, false).unwrap());
    }
}
