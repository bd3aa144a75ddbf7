//! The data-parallel group's collectives across processes (dist::nccl): every rank a process of
//! this test binary, started as `torchrun` would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT), on the virtual GPU's devices and NCCL stand-in, or on real GPUs when there are
//! enough. Each result is checked against what it must be on every rank; a rank that dies or
//! hangs must make the others exit non-zero within the timeout, naming it.
//! Skips without a GPU (`SKIPPED (no GPU): ...`), fails under REQUIRE_GPU=1.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use invaspread::cuda::{device_count, Gpu};
use invaspread::dist::nccl::ProcessGroup;
use invaspread::dist::DistEnv;
use invaspread::testing::gpu_or_skip;

/// The environment variable that makes this binary a rank: what the rank does.
const ROLE: &str = "INVASPREAD_TEST_RANK_ROLE";
/// The watchdog's timeout in the fault cases, in seconds.
const FAULT_TIMEOUT_S: u64 = 4;

/// Whether `ranks` ranks can run here (the virtual GPU has as many devices as asked for).
fn ranks_or_skip(name: &str, ranks: usize) -> bool {
    let Some(gpu) = gpu_or_skip(name) else {
        return false;
    };
    if !gpu.is_virtual() && device_count().unwrap_or(0) < ranks {
        eprintln!("SKIPPED (fewer than {ranks} GPUs): {name}");
        return false;
    }
    true
}

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
                .args(["--exact", "rank_main", "--nocapture", "--include-ignored"])
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

/// A rank of a group that the other tests start (as a child process with `ROLE` set).
#[test]
#[ignore = "run by the other tests of this file as a rank of a process group"]
fn rank_main() {
    let role = std::env::var(ROLE).expect("started by a test of this file, with its role");
    if let Err(e) = run_rank(&role) {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

fn collectives_match(ranks: usize) {
    let name = format!("collectives_across_{ranks}_processes");
    if !ranks_or_skip(&name, ranks) {
        return;
    }
    let results = wait_group(
        spawn_group(ranks, "collectives"),
        Duration::from_secs(300),
        None,
    );
    for (rank, (out, _)) in results.iter().enumerate() {
        assert!(
            out.status.success(),
            "rank {rank} of {ranks}: {}",
            text(out)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("every collective matched"),
            "rank {rank}: {}",
            text(out)
        );
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
