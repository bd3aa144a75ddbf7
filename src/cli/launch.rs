//! `invaspread launch`: the ranks of a data-parallel group on this machine (`dist::launch`).

use std::ffi::OsString;
use std::time::Duration;

use invaspread::dist::launch::{launch, LaunchPlan, MAX_LOCAL_RANKS};

#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// Ranks on this machine, one per GPU (rank i uses device LOCAL_RANK = i) [1 <= gpus <= 64].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_LOCAL_RANKS as i64))]
    gpus: u16,
    /// Machines in the group, each running this command with the same --gpus [1 <= nnodes <= 1024].
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    nnodes: u16,
    /// This machine's place among them (0 holds rank 0).
    #[arg(long, default_value_t = 0)]
    node_rank: u16,
    /// Rank 0's host name or address, reachable from every machine.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Rank 0's rendezvous port (0: a free port, one machine only).
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// Seconds the other ranks get to stop after one fails, before they are killed [0 <= grace <= 3600].
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(0..=3600))]
    grace_seconds: u16,
    /// The invaspread command every rank runs, after `--` (for example `-- train --device cuda ...`).
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<OsString>,
}

/// The commands whose ranks form one data-parallel group; any other would run N copies that
/// write the same files.
const GROUP_COMMANDS: [&str; 2] = ["train", "bench-loss"];

/// The subcommand of `command` (after the global `--threads T`), when it is one of
/// [`GROUP_COMMANDS`]; an error naming it otherwise.
fn group_command(command: &[OsString]) -> invaspread::Result<()> {
    let mut words = command.iter().map(|w| w.to_string_lossy());
    let mut name = None;
    while let Some(word) = words.next() {
        if word == "--threads" {
            words.next();
        } else if !word.starts_with("--threads=") {
            name = Some(word.into_owned());
            break;
        }
    }
    let name = name.unwrap_or_default();
    if GROUP_COMMANDS.contains(&name.as_str()) {
        return Ok(());
    }
    Err(invaspread::Error::invalid(format!(
        "launch runs a command whose ranks form one data-parallel group ({}); `{name}` would \
         run one copy per rank, each writing the same files: run it without launch",
        GROUP_COMMANDS.join(", ")
    )))
}

pub fn run(args: LaunchArgs) -> invaspread::Result<()> {
    group_command(&args.command)?;
    let exe = std::env::current_exe()
        .map_err(|e| invaspread::Error::invalid(format!("finding this program's path: {e}")))?;
    let plan = LaunchPlan {
        local_ranks: usize::from(args.gpus),
        nodes: usize::from(args.nnodes),
        node_rank: usize::from(args.node_rank),
        master_addr: args.master_addr,
        master_port: args.master_port,
    };
    launch(
        &exe,
        &args.command,
        &plan,
        Duration::from_secs(u64::from(args.grace_seconds)),
    )
}
