//! `invaspread bench-loss --device cuda --ranks R`: the gathered loss over R data-parallel ranks
//! (`bench::gathered`), one process and GPU per rank; rank 0 prints the table.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;

use invaspread::bench::bench_input;
use invaspread::bench::gathered::{bench_rank, RankRow, RankTruth};
use invaspread::cuda::Gpu;
use invaspread::dist::data_parallel::DataParallel;
use invaspread::dist::launch::{launch, LaunchPlan};
use invaspread::dist::nccl::ProcessGroup;
use invaspread::dist::DistEnv;
use invaspread::loss::check::REFERENCE_MAX_N;
use invaspread::loss::cuda::{check_version_supports, CudaLossVersion};
use invaspread::loss::LossConfig;
use invaspread::names::Named;
use invaspread::Error;

use super::bench_loss::BenchLossArgs;
use super::Device;

/// How long the rendezvous and every collective may take before the ranks give up.
const TIMEOUT: Duration = Duration::from_secs(300);

pub fn run(args: &BenchLossArgs, cfg: &LossConfig) -> invaspread::Result<()> {
    let ranks = usize::from(args.ranks);
    if !matches!(args.device, Device::Cuda) {
        return Err(Error::invalid(format!(
            "bench-loss --ranks {ranks}: data-parallel ranks need --device cuda"
        )));
    }
    if args.json {
        return Err(Error::invalid(
            "bench-loss --ranks: --json is not available with ranks (markdown only)",
        ));
    }
    let Some(env) = DistEnv::from_env()? else {
        // Not a rank yet: start the ranks, each running this same command.
        let exe = std::env::current_exe()
            .map_err(|e| Error::invalid(format!("finding this program's path: {e}")))?;
        let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
        let plan = LaunchPlan {
            local_ranks: ranks,
            nodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
        };
        return launch(&exe, &argv, &plan, Duration::from_secs(10));
    };
    if env.world_size != ranks {
        return Err(Error::invalid(format!(
            "bench-loss --ranks {ranks} in a group of WORLD_SIZE={}: expected the same count",
            env.world_size
        )));
    }
    let sizes = if args.n.is_empty() {
        vec![1024, 4096, 16384]
    } else {
        args.n.clone()
    };
    let gpu = Arc::new(Gpu::require_ordinal(env.local_rank)?);
    let config = serde_json::json!({
        "bench-loss": {"n": sizes, "d": args.d, "tau": cfg.tau, "semantics": cfg.semantics.name()}
    })
    .to_string();
    let group = ProcessGroup::join(&gpu, &env, config.into_bytes(), TIMEOUT)?;
    let dp = DataParallel::new(group);
    let mut rows: Vec<RankRow> = Vec::new();
    for &n in &sizes {
        let elements = (n as u64).checked_mul(args.d as u64);
        invaspread::limits::check_allocation(
            &format!("bench-loss --n {n} --d {}", args.d),
            elements.and_then(|e| e.checked_mul(4 * 6)),
        )?;
        let global = bench_input(n, args.d);
        let truth = if n <= args.check_max_n.min(REFERENCE_MAX_N) {
            Some(RankTruth::of(&global, n, args.d, cfg, env.rank, ranks)?)
        } else {
            None
        };
        let cases = CudaLossVersion::all().flat_map(|v| {
            let own = v == CudaLossVersion::FusedV2 && dp.runs_own_rows(v, cfg);
            [(v, false)].into_iter().chain(own.then_some((v, true)))
        });
        for (version, own_rows) in cases {
            if check_version_supports(cfg, version).is_err() {
                continue;
            }
            if env.rank == 0 {
                eprintln!(
                    "measuring {} N={n} d={} over {ranks} ranks",
                    label(version, own_rows),
                    args.d
                );
            }
            let row = bench_rank(
                &gpu,
                &dp,
                (version, own_rows),
                &global,
                (n, args.d),
                cfg,
                truth.as_ref(),
                args.min_seconds,
            )?;
            let bound = version.tolerance(cfg.tau, args.d, false).either();
            if let Some(err) = row.error.filter(|e| e.is_nan() || *e > bound) {
                return Err(Error::invalid(format!(
                    "rank {}: the gathered loss with {} at N = {n} is {err:.3e} from the float64 \
                     truth (loss relative, this rank's dL/dz rows scaled by row norms), above {bound:.1e}",
                    env.rank,
                    label(version, own_rows)
                )));
            }
            rows.push(row);
        }
    }
    if env.rank == 0 {
        print_table(&rows, cfg, &gpu.name()?);
    }
    Ok(())
}

fn print_table(rows: &[RankRow], cfg: &LossConfig, device: &str) {
    println!("rank 0's device: {device}\n");
    println!("| version | N | d | ranks | median ms | calls | error vs f64 (rank 0) |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.3} | {} | {} |",
            label(r.version, r.own_rows),
            r.n,
            r.d,
            r.ranks,
            r.median_ms,
            r.calls,
            r.error.map_or("unchecked".into(), |e| format!("{e:.1e}"))
        );
    }
    println!(
        "\none call: both views' rows all-gathered from every rank, the loss and dL/dz of all N \
         rows ({} semantics, tau {}), this rank's rows of dL/dz kept, waited for (own rows: the \
         loss rows of this rank's queries alone, the key side reduce-scattered, the shares of \
         the loss all-gathered); every rank checked its own rows against the float64 truth of \
         the global batch before timing",
        cfg.semantics, cfg.tau
    );
}

/// A version's name in the table: `fused-v2 own rows` for the loss rows of a rank's queries.
fn label(version: CudaLossVersion, own_rows: bool) -> String {
    if own_rows {
        format!("{} own rows", version.name())
    } else {
        version.name()
    }
}
