//! The data-parallel group's collectives across processes (dist::nccl): every rank a process of
//! this test binary, started as `torchrun` would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT), on the virtual GPU's devices and NCCL stand-in, or on real GPUs when there are
//! enough. Each result is checked against what it must be on every rank; a rank that dies or
//! hangs must make the others exit non-zero within the timeout, naming it.
//! Skips without a GPU (`SKIPPED (no GPU): ...`), fails under REQUIRE_GPU=1.
use crate::common::ranks_or_skip;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use invaspread::backend::Backend;
use invaspread::backend::Cpu;
use invaspread::backend::CudaBackend;
use invaspread::bench::gathered::{rank_rows, RankTruth};
use invaspread::cuda::Gpu;
use invaspread::dist::collectives::Collectives;
use invaspread::dist::data_parallel::DataParallel;
use invaspread::dist::nccl::ProcessGroup;
use invaspread::dist::DistEnv;
use invaspread::loss::cuda::CudaLossVersion;
use invaspread::loss::gathered::RankLayout;
use invaspread::loss::{reference, GradSemantics, LossConfig};
use invaspread::nn::models::{Model, ModelKind, EMBED_DIM};
use invaspread::nn::optim::{Sgd, SgdConfig};
use invaspread::nn::step::{train_step, update_error};
use invaspread::ops::Shape4;
use invaspread::tape::params::ParamStore;
use invaspread::tape::Graph;
use invaspread::testing::{random_matrix, rng};

/// The environment variable that makes this binary a rank: what the rank does.
const ROLE: &str = "INVASPREAD_TEST_RANK_ROLE";
/// The watchdog's timeout in the fault cases, in seconds.
const FAULT_TIMEOUT_S: u64 = 4;

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// Starts `ranks` processes of this binary running `rank_main` with `role`.
fn spawn_group(ranks: usize, role: &str) -> Vec<Child> {
    let port = free_port().to_string();
    let exe = std::env::current_exe().expect("the test binary");
    (0..ranks)
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "dist::rank_main",
                    "--nocapture",
                    "--include-ignored",
                ])
                .env(ROLE, role)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", ranks.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("INVASPREAD_VGPU_DEVICES", ranks.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting a rank")
        })
        .collect()
}

/// Waits for every rank but `except` (a rank made to hang), killing those still running then or
/// at `limit`; (output, seconds to exit: infinite for a rank killed).
fn wait_group(children: Vec<Child>, limit: Duration, except: Option<usize>) -> Vec<(Output, f64)> {
    let start = Instant::now();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut ended: Vec<Option<f64>> = vec![None; children.len()];
    let waiting = |ended: &[Option<f64>]| {
        ended
            .iter()
            .enumerate()
            .any(|(rank, end)| end.is_none() && Some(rank) != except)
    };
    while waiting(&ended) && start.elapsed() < limit {
        for (child, end) in children.iter_mut().zip(ended.iter_mut()) {
            if end.is_none() {
                if let Some(c) = child.as_mut() {
                    if c.try_wait().expect("polling a rank").is_some() {
                        *end = Some(start.elapsed().as_secs_f64());
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    children
        .into_iter()
        .zip(ended)
        .map(|(child, end)| {
            let mut child = child.expect("every rank was started");
            if end.is_none() {
                let _ = child.kill();
            }
            let out = child.wait_with_output().expect("a rank's output");
            (out, end.unwrap_or(f64::INFINITY))
        })
        .collect()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The values rank `rank` starts a collective with: distinct per rank, element and call.
fn input(rank: usize, len: usize, call: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (rank * 1000 + i * 7 + call * 100_000) as f32 * 0.25)
        .collect()
}

/// One rank: every collective once, each result compared with what it must be; or, with a
/// fault role, a rank that dies or hangs at its second collective.
fn run_rank(role: &str) -> Result<(), String> {
    let env = DistEnv::from_env()
        .map_err(|e| e.to_string())?
        .ok_or("WORLD_SIZE is not set")?;
    let gpu = Gpu::require_ordinal(env.local_rank).map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(if role == "collectives" {
        120
    } else {
        FAULT_TIMEOUT_S
    });
    let mut group = ProcessGroup::join(&gpu, &env, b"{\"test\":1}".to_vec(), timeout)
        .map_err(|e| e.to_string())?;
    let (r, world) = (env.rank, env.world_size);
    let stream = gpu.stream().clone();
    let upload = |v: &[f32]| stream.clone_htod(v).map_err(|e| e.to_string());
    let download =
        |v: &cudarc::driver::CudaSlice<f32>| stream.clone_dtoh(v).map_err(|e| e.to_string());
    let expect = |what: &str, got: Vec<f32>, want: Vec<f32>| {
        if got == want {
            Ok(())
        } else {
            Err(format!("rank {r}: {what}: got {got:?}, expected {want:?}"))
        }
    };

    // The first all-reduce: every rank, also in the fault cases.
    let len = 37;
    let mut buf = upload(&input(r, len, 0))?;
    group
        .all_reduce_sum(&mut buf, "all-reduce")
        .map_err(|e| e.to_string())?;
    let want: Vec<f32> = (0..len)
        .map(|i| (0..world).map(|q| input(q, len, 0)[i]).sum())
        .collect();
    expect("all-reduce", download(&buf)?, want)?;

    match role {
        "die" if r == 1 => std::process::exit(3),
        "hang" if r == world - 1 => std::thread::sleep(Duration::from_secs(3600)),
        _ => {}
    }

    let send = upload(&input(r, 5, 1))?;
    let mut gathered = upload(&vec![0.0; 5 * world])?;
    group
        .all_gather(&send, &mut gathered, "all-gather")
        .map_err(|e| e.to_string())?;
    expect(
        "all-gather",
        download(&gathered)?,
        (0..world).flat_map(|q| input(q, 5, 1)).collect(),
    )?;

    let part = 3;
    let send = upload(&input(r, part * world, 2))?;
    let mut mine = upload(&vec![0.0; part])?;
    group
        .reduce_scatter_sum(&send, &mut mine, "reduce-scatter")
        .map_err(|e| e.to_string())?;
    let want: Vec<f32> = (0..part)
        .map(|j| {
            (0..world)
                .map(|q| input(q, part * world, 2)[r * part + j])
                .sum()
        })
        .collect();
    expect("reduce-scatter", download(&mine)?, want)?;

    let root = world - 1;
    let mut buf = upload(&input(r, 9, 3))?;
    group
        .broadcast(&mut buf, root, "broadcast")
        .map_err(|e| e.to_string())?;
    expect("broadcast", download(&buf)?, input(root, 9, 3))?;
    println!("rank {r}: every collective matched");
    Ok(())
}

// ---- the loss rows of a rank's own queries --------------------------------------------------

/// `DataParallel::own_rows_loss` (fused-v2's ranks_v1 kernels) on every rank against the
/// float64 truth of the global batch: m = 37 images a rank (own rows across two 64-row tiles,
/// N not a multiple of the tile), d = 130 (past one 128-column sweep, not a multiple of 4),
/// near-duplicate rows across ranks; a second call must give the same bits.
fn own_rows_rank(role: &str) -> Result<(), String> {
    let env = DistEnv::from_env()
        .map_err(|e| e.to_string())?
        .ok_or("WORLD_SIZE is not set")?;
    let gpu = Arc::new(Gpu::require_ordinal(env.local_rank).map_err(|e| e.to_string())?);
    let timeout = Duration::from_secs(120);
    let group = ProcessGroup::join(&gpu, &env, b"{\"test\":2}".to_vec(), timeout)
        .map_err(|e| e.to_string())?;
    let dp = DataParallel::new(group);
    let (r, world, m, d) = (env.rank, env.world_size, 37, 130);
    let n = 2 * m * world;
    let mut global = random_matrix(&mut rng(900), n, d);
    for k in 0..12 {
        let (from, to) = ((k * 29) % n, (k * 29 + 5 * m + 3) % n);
        let noise = random_matrix(&mut rng(901 + k as u64), 1, d);
        for j in 0..d {
            global[to * d + j] = global[from * d + j] + 1e-4 * noise[j];
        }
    }
    let cfg = LossConfig {
        semantics: semantics_of(role),
        ..LossConfig::default()
    };
    let err = |e: invaspread::Error| format!("rank {r}: {e}");
    let truth = RankTruth::of(&global, n, d, &cfg, r, world).map_err(err)?;
    let rows = rank_rows(&global, n, d, r, world).map_err(err)?;
    let stream = gpu.stream().clone();
    let z = stream.clone_htod(&rows).map_err(|e| e.to_string())?;
    let mut dz = stream
        .alloc_zeros::<f32>(rows.len())
        .map_err(|e| e.to_string())?;
    let mut loss = stream.alloc_zeros::<f32>(1).map_err(|e| e.to_string())?;
    let mut call = || -> Result<(Vec<f32>, Vec<f32>), String> {
        dp.own_rows_loss(&gpu, &z, (2 * m, d), &cfg, &mut loss, &mut dz)
            .map_err(err)?;
        let host =
            |b: &cudarc::driver::CudaSlice<f32>| stream.clone_dtoh(b).map_err(|e| e.to_string());
        Ok((host(&loss)?, host(&dz)?))
    };
    let first = call()?;
    if call()? != first {
        return Err(format!("rank {r}: a second call gave other bits"));
    }
    let error = truth.error(f64::from(first.0[0]), &first.1, &rows, d);
    let bound = CudaLossVersion::FusedV2
        .tolerance(cfg.tau, d, true)
        .either();
    if error.is_nan() || error > bound {
        return Err(format!(
            "rank {r}: own rows {role}: {error:.3e} from the float64 truth, above {bound:.1e}"
        ));
    }
    println!("rank {r}: own rows matched the float64 truth: error {error:.2e}");
    Ok(())
}

/// 2 ranks query-only and 3 both-sides (the key side's reduce-scatter).
#[test]
fn own_query_rows_match_the_float64_truth() {
    for (ranks, role) in [(2, "own-rows-query-only"), (3, "own-rows-both-sides")] {
        let name = format!("own_query_rows_{ranks}_ranks_{role}");
        group_succeeds(&name, ranks, role, "own rows matched the float64 truth");
    }
}

// ---- training steps ------------------------------------------------------------------------

const IMAGES_PER_RANK: usize = 2;
const SIDE: usize = 8;
const STEPS: usize = 3;
const LR: f64 = 0.03;
/// Bound on each parameter's update error against the float64 reference, relative to that
/// update's size. Measured: up to 5.5e-5 on the virtual GPU (2 and 3 ranks); a rank
/// whose gradient missed the other ranks' share, or a wrong partner row, is off by O(1).
const UPDATE_TOLERANCE: f64 = 1e-3;
/// Gradient buckets of the per-rank BatchNorm runs: 64 KiB, a few of convnet-small's layers.
const BUCKET_FLOATS: usize = 16_384;

fn semantics_of(role: &str) -> GradSemantics {
    if role.ends_with("both-sides") {
        GradSemantics::BothSides
    } else {
        GradSemantics::QueryOnly
    }
}

/// Step `step`'s global batch of `images` images (both views, view A of every image first).
fn global_batch(step: usize, images: usize) -> Vec<f32> {
    random_matrix(&mut rng(700 + step as u64), 1, 2 * images * 3 * SIDE * SIDE)
}

/// Rank r's part of a global batch: its images' view A rows, then their view B rows.
fn rank_views(global: &[f32], images: usize, r: usize) -> Vec<f32> {
    even_layout(images).take_rank_rows(global, 3 * SIDE * SIDE, r)
}

/// `images` images split evenly over the ranks (IMAGES_PER_RANK each).
fn even_layout(images: usize) -> RankLayout {
    RankLayout::new(&vec![IMAGES_PER_RANK; images / IMAGES_PER_RANK]).unwrap()
}

fn local_shape() -> Shape4 {
    Shape4 {
        n: 2 * IMAGES_PER_RANK,
        c: 3,
        h: SIDE,
        w: SIDE,
    }
}

fn parameters<B: Backend>(graph: &Graph<B>) -> Vec<Vec<f32>> {
    let b = &graph.backend;
    graph
        .params
        .params
        .iter()
        .map(|p| b.download(&p.value).unwrap())
        .collect()
}

/// The float64 truth for `ranks` ranks with BatchNorm per rank: per step, every rank's
/// embeddings (its own 2m rows through the encoder), the loss of all of them together (the
/// reference, on one device's layout), then each rank's backward from its rows of that
/// gradient, summed into one update. Returns each step's loss and the parameters before and after.
fn per_rank_reference(ranks: usize, cfg: &LossConfig) -> (Vec<f64>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let b = Cpu::<f64>::new();
    let mut store = ParamStore::default();
    let model = Model::new(ModelKind::ConvnetSmall, &mut store, &b, 0).unwrap();
    let mut graph = Graph::new(b, store);
    let mut sgd = Sgd::new(SgdConfig::default());
    let before = parameters(&graph);
    let (images, d) = (ranks * IMAGES_PER_RANK, EMBED_DIM);
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let global = global_batch(step, images);
        let embed = |graph: &mut Graph<Cpu<f64>>, r: usize| {
            graph.begin();
            let x = graph
                .input(&rank_views(&global, images, r), local_shape())
                .unwrap();
            model.forward(graph, x, true).unwrap()
        };
        let layout = even_layout(images);
        let mut z_all = vec![0.0f32; 2 * images * d];
        for r in 0..ranks {
            let z = embed(&mut graph, r);
            layout.put_rank_rows(&graph.value(z).unwrap(), d, r, &mut z_all);
        }
        let out = reference::instance_loss(&z_all, 2 * images, d, cfg, true).unwrap();
        let dz_all = out.grad_z.unwrap();
        losses.push(out.loss);
        graph.params.zero_grad(&graph.backend).unwrap();
        for r in 0..ranks {
            let dz: Vec<f32> = layout
                .take_rank_rows(&dz_all, d, r)
                .into_iter()
                .map(|g| g as f32)
                .collect();
            let z = embed(&mut graph, r);
            let root = graph.given_loss(z, out.loss, &dz).unwrap();
            graph.backward(root).unwrap();
        }
        sgd.update(&graph.backend, &mut graph.params, LR).unwrap();
    }
    (losses, before, parameters(&graph))
}

/// The float64 truth with `--sync-bn`: one device trained on the global batches.
fn single_device_reference(
    ranks: usize,
    cfg: &LossConfig,
) -> (Vec<f64>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let b = Cpu::<f64>::new();
    let mut store = ParamStore::default();
    let model = Model::new(ModelKind::ConvnetSmall, &mut store, &b, 0).unwrap();
    let mut graph = Graph::new(b, store);
    let mut sgd = Sgd::new(SgdConfig::default());
    let before = state(&graph);
    let images = ranks * IMAGES_PER_RANK;
    let shape = Shape4 {
        n: 2 * images,
        ..local_shape()
    };
    let losses = (0..STEPS)
        .map(|step| {
            let views = global_batch(step, images);
            train_step(&mut graph, &model, &mut sgd, &views, shape, cfg, LR).unwrap()
        })
        .collect();
    (losses, before, state(&graph))
}

/// Every parameter, then every BatchNorm's running mean and variance.
fn state<B: Backend>(graph: &Graph<B>) -> Vec<Vec<f32>> {
    let b = &graph.backend;
    let mut out = parameters(graph);
    for bn in &graph.params.bns {
        out.push(b.download(&bn.running_mean).unwrap());
        out.push(b.download(&bn.running_var).unwrap());
    }
    out
}

/// One rank of data-parallel training: STEPS steps of convnet-small on its shard of each global
/// batch, then its losses and parameters against the per-rank float64 reference.
fn train_rank(role: &str) -> Result<(), String> {
    let env = DistEnv::from_env()
        .map_err(|e| e.to_string())?
        .ok_or("WORLD_SIZE is not set")?;
    let gpu = Gpu::require_ordinal(env.local_rank).map_err(|e| e.to_string())?;
    let group = ProcessGroup::join(
        &gpu,
        &env,
        role.as_bytes().to_vec(),
        Duration::from_secs(120),
    )
    .map_err(|e| e.to_string())?;
    let sync_bn = role.contains("sync-bn");
    // Per-rank BatchNorm: gradients summed in buckets of BUCKET_FLOATS, queued during the
    // backward pass (convnet-small's gradients make several); with --sync-bn, the default cap
    // (two buckets: the first of 1 MiB during the pass, the rest after it): both must give the
    // reference's update.
    let dp = DataParallel::new(group).with_sync_bn(sync_bn);
    let dp = if sync_bn {
        dp
    } else {
        dp.with_bucket_floats(BUCKET_FLOATS)
    };
    let dp = Arc::new(dp);
    let cuda = CudaBackend::new(Arc::new(gpu)).map_err(|e| e.to_string())?;
    let cfg = LossConfig {
        semantics: semantics_of(role),
        ..LossConfig::default()
    };
    let mut store = ParamStore::default();
    let model =
        Model::new(ModelKind::ConvnetSmall, &mut store, &cuda, 0).map_err(|e| e.to_string())?;
    let mut graph = Graph::new(cuda, store);
    dp.clone().install(&mut graph).map_err(|e| e.to_string())?;
    let mut sgd = Sgd::new(SgdConfig::default());
    let images = env.world_size * IMAGES_PER_RANK;
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let views = rank_views(&global_batch(step, images), images, env.rank);
        let loss = train_step(
            &mut graph,
            &model,
            &mut sgd,
            &views,
            local_shape(),
            &cfg,
            LR,
        )
        .map_err(|e| e.to_string())?;
        losses.push(loss);
    }
    // Per-rank BatchNorm updates the running statistics with each rank's own batch, so only
    // the parameters are compared there; with --sync-bn, the running statistics too.
    let (got, (want_losses, before, want), truth) = if sync_bn {
        let reference = single_device_reference(env.world_size, &cfg);
        (state(&graph), reference, "one device on the global batch")
    } else {
        let reference = per_rank_reference(env.world_size, &cfg);
        (parameters(&graph), reference, "the per-rank reference")
    };
    for (step, (l, w)) in losses.iter().zip(&want_losses).enumerate() {
        if (l - w).abs() > 1e-4 * w.abs() {
            return Err(format!(
                "rank {}: step {step}: loss {l}, the reference's {w}",
                env.rank
            ));
        }
    }
    let buckets = dp.gradient_buckets().map_err(|e| e.to_string())?;
    let want_buckets = if sync_bn { 2 } else { 5 };
    if buckets < want_buckets {
        return Err(format!(
            "rank {}: the last step summed the gradients in {buckets} all-reduces, expected at \
             least {want_buckets}",
            env.rank
        ));
    }
    let mut worst = 0.0f64;
    for (i, ((g, w), b)) in got.iter().zip(&want).zip(&before).enumerate() {
        let e = update_error(b, g, w);
        if e.is_nan() || e > UPDATE_TOLERANCE {
            return Err(format!(
                "rank {}: tensor {i}'s update is {e:.3e} from {truth}'s (bound {UPDATE_TOLERANCE:.0e})",
                env.rank
            ));
        }
        worst = worst.max(e);
    }
    println!(
        "rank {}: {STEPS} steps matched {truth}: losses {losses:?}, largest update error \
         {worst:.2e}, gradients in {buckets} all-reduces",
        env.rank
    );
    Ok(())
}

/// A rank of a group that the other tests start (as a child process with `ROLE` set).
#[test]
#[ignore = "run by the other tests of this file as a rank of a process group"]
fn rank_main() {
    let role = std::env::var(ROLE).expect("started by a test of this file, with its role");
    let outcome = if role.starts_with("train") {
        train_rank(&role)
    } else if role.starts_with("own-rows") {
        own_rows_rank(&role)
    } else {
        run_rank(&role)
    };
    if let Err(e) = outcome {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

/// Runs `ranks` ranks with `role`; each must succeed and print `success`.
fn group_succeeds(name: &str, ranks: usize, role: &str, success: &str) {
    if !ranks_or_skip(name, ranks) {
        return;
    }
    let results = wait_group(spawn_group(ranks, role), Duration::from_secs(600), None);
    for (rank, (out, _)) in results.iter().enumerate() {
        assert!(
            out.status.success(),
            "{name}: rank {rank} of {ranks}: {}",
            text(out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(success),
            "{name}: rank {rank}: {}",
            text(out)
        );
        for line in stdout.lines().filter(|l| l.contains(success)) {
            eprintln!("{name}: {line}");
        }
    }
}

fn collectives_match(ranks: usize) {
    let name = format!("collectives_across_{ranks}_processes");
    group_succeeds(&name, ranks, "collectives", "every collective matched");
}

/// 2 ranks with one gradient semantics, 3 with the other, BatchNorm per rank: STEPS steps of
/// convnet-small against the float64 reference that normalizes each rank's rows apart.
#[test]
fn data_parallel_steps_match_the_per_rank_reference() {
    // Each semantics once (the sync-bn test below runs every pair): CI's time.
    for (ranks, role) in [(2, "train-query-only"), (3, "train-both-sides")] {
        let name = format!("data_parallel_steps_{ranks}_ranks_{role}");
        group_succeeds(&name, ranks, role, "matched the per-rank reference");
    }
}

/// With `--sync-bn`: STEPS steps of convnet-small give the float64 reference's losses,
/// parameters and running statistics of one device on the same global batches. The other
/// pairs of ranks and semantics run through `train` in tests/gpu/train_ranks.rs, against one
/// device's float32 run.
#[test]
fn data_parallel_steps_with_sync_bn_match_one_device() {
    for (ranks, role) in [
        (2, "train-sync-bn-both-sides"),
        (3, "train-sync-bn-query-only"),
    ] {
        let name = format!("data_parallel_sync_bn_{ranks}_ranks_{role}");
        group_succeeds(&name, ranks, role, "matched one device on the global batch");
    }
}

#[test]
fn collectives_across_2_processes() {
    collectives_match(2);
}

#[test]
fn collectives_across_3_processes() {
    collectives_match(3);
}

/// Rank `faulty` dies (`die`) or hangs (`hang`) at the second collective: every other rank must
/// exit non-zero within the timeout (plus start-up), and rank 0's error must name the rank.
fn fault_is_named(role: &str, ranks: usize, faulty: usize) {
    let name = format!("a_rank_that_{role}s_is_named");
    if !ranks_or_skip(&name, ranks) {
        return;
    }
    // Start-up on the virtual GPU takes seconds per process on two cores; the limit only stops
    // a hang from stalling the suite, the timeout itself is checked below from the messages.
    let results = wait_group(
        spawn_group(ranks, role),
        Duration::from_secs(180),
        Some(faulty),
    );
    for (rank, (out, secs)) in results.iter().enumerate() {
        if rank == faulty {
            continue;
        }
        assert!(
            secs.is_finite(),
            "rank {rank} was still running after 180 s: {}",
            text(out)
        );
        assert!(
            !out.status.success(),
            "rank {rank} succeeded: {}",
            text(out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("data-parallel group"),
            "rank {rank}: {}",
            text(out)
        );
    }
    let err0 = String::from_utf8_lossy(&results[0].0.stderr).into_owned();
    assert!(
        err0.contains(&format!("rank {faulty}")),
        "rank 0's error does not name rank {faulty}: {}",
        text(&results[0].0)
    );
    for (rank, (out, secs)) in results.iter().enumerate() {
        if rank != faulty {
            eprintln!(
                "{name}: rank {rank} exited after {secs:.1} s: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    if role == "hang" {
        assert!(
            err0.contains(&format!("within {FAULT_TIMEOUT_S} s")),
            "rank 0 did not stop at the timeout: {}",
            text(&results[0].0)
        );
    }
}

#[test]
fn a_rank_that_dies_is_named() {
    fault_is_named("die", 3, 1);
}

#[test]
fn a_rank_that_hangs_is_named() {
    fault_is_named("hang", 3, 2);
}
