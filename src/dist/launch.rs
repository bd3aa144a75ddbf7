//! Starting the ranks of a data-parallel group on this machine, as `torchrun` does: one process
//! per GPU, each with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and
//! `MASTER_PORT` set, its output lines prefixed with `[rank r]` (but for rank 0's standard
//! output, which passes through as it is: a table, JSON). When one rank fails, the others
//! are stopped (SIGTERM, then SIGKILL after a grace period) and the launch fails naming the rank,
//! so a group never lingers with a member gone. Several machines: the same command on each, with
//! `nodes` and its own `node_rank`, and rank 0's machine as the master address.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Where this machine's ranks sit in the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Ranks on this machine (one per GPU: local rank i uses device i).
    pub local_ranks: usize,
    /// Machines in the group, each with `local_ranks` ranks.
    pub nodes: usize,
    /// This machine's place, 0 .. nodes (node 0 holds rank 0).
    pub node_rank: usize,
    /// Rank 0's host and port (port 0: a free port, on one machine only).
    pub master_addr: String,
    pub master_port: u16,
}

/// The most ranks one machine starts.
pub const MAX_LOCAL_RANKS: usize = 64;

impl LaunchPlan {
    fn validate(&self) -> Result<()> {
        if !(1..=MAX_LOCAL_RANKS).contains(&self.local_ranks) {
            return Err(Error::invalid(format!(
                "--gpus {}: expected 1 to {MAX_LOCAL_RANKS} ranks on this machine",
                self.local_ranks
            )));
        }
        if self.nodes == 0 || self.node_rank >= self.nodes {
            return Err(Error::invalid(format!(
                "--node-rank {} of --nnodes {}: expected a node rank below the node count",
                self.node_rank, self.nodes
            )));
        }
        if self.master_port == 0 && self.nodes > 1 {
            return Err(Error::invalid(
                "--master-port 0 (a free port) works on one machine only: give every machine \
                 the same port",
            ));
        }
        Ok(())
    }
}

/// A free TCP port on this machine (for a group on one machine).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Peer(format!("finding a free port for MASTER_PORT: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Peer(format!("finding a free port for MASTER_PORT: {e}")))
}

/// Copies `from` line by line to stdout or stderr with `prefix` before each line.
fn relay(
    from: impl Read + Send + 'static,
    prefix: String,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).split(b'\n') {
            let Ok(line) = line else { break };
            let text = format!("{prefix}{}\n", String::from_utf8_lossy(&line));
            // A closed terminal or pipe ends the relay quietly; the rank keeps running.
            let written = if to_stderr {
                std::io::stderr().write_all(text.as_bytes())
            } else {
                std::io::stdout().write_all(text.as_bytes())
            };
            if written.is_err() {
                break;
            }
        }
    })
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => "an unknown status".into(),
    }
}

/// Runs `program args` as this machine's ranks of `plan` and waits for all of them. The first
/// rank to fail stops the others after `grace`; the error names it and its status.
pub fn launch(program: &Path, args: &[OsString], plan: &LaunchPlan, grace: Duration) -> Result<()> {
    plan.validate()?;
    let port = match plan.master_port {
        0 => free_port()?,
        p => p,
    };
    let world = plan.local_ranks * plan.nodes;
    let first = plan.node_rank * plan.local_ranks;
    let virtual_gpu = std::env::var("INVASPREAD_GPU").is_ok_and(|v| v.trim() == "virtual");
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut relays = Vec::new();
    for local in 0..plan.local_ranks {
        let rank = first + local;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", plan.local_ranks.to_string())
            .env("MASTER_ADDR", &plan.master_addr)
            .env("MASTER_PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The virtual GPU shows as many devices as asked for; one per local rank.
        if virtual_gpu && std::env::var_os("INVASPREAD_VGPU_DEVICES").is_none() {
            cmd.env("INVASPREAD_VGPU_DEVICES", plan.local_ranks.to_string());
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                stop(&mut children, grace);
                return Err(Error::Peer(format!(
                    "starting rank {rank} ({}): {e}",
                    program.display()
                )));
            }
        };
        let prefix = format!("[rank {rank}] ");
        if let Some(out) = child.stdout.take() {
            // Rank 0's results (a table, JSON) pass through as they are.
            let out_prefix = if rank == 0 {
                String::new()
            } else {
                prefix.clone()
            };
            relays.push(relay(out, out_prefix, false));
        }
        if let Some(err) = child.stderr.take() {
            relays.push(relay(err, prefix, true));
        }
        children.push((rank, child));
    }
    let failure = watch(&mut children, grace);
    for r in relays {
        let _ = r.join();
    }
    match failure {
        None => Ok(()),
        Some((rank, status)) => Err(Error::Peer(format!(
            "rank {rank} ended with {}; the other ranks of this machine were stopped",
            describe(status)
        ))),
    }
}

/// Waits for every child; at the first failure stops the rest. Returns the first failure.
fn watch(children: &mut [(usize, Child)], grace: Duration) -> Option<(usize, ExitStatus)> {
    let mut done = vec![false; children.len()];
    loop {
        let mut failure = None;
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    done[i] = true;
                    if !status.success() {
                        failure = Some((*rank, status));
                        break;
                    }
                }
                Ok(None) => {}
                Err(_) => done[i] = true,
            }
        }
        if let Some(failed) = failure {
            stop(children, grace);
            return Some(failed);
        }
        if done.iter().all(|&d| d) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to every child still running, SIGKILL to those left after `grace`, then reaps all.
fn stop(children: &mut [(usize, Child)], grace: Duration) {
    for (_, child) in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) on our own child's pid, not yet reaped (try_wait said running).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && children
            .iter_mut()
            .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (_, child) in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}
