//! Data-parallel training's process group: where a process sits in
//! the group (PyTorch's launcher variables: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`) and the start-up rendezvous ([`rendezvous`]) in which rank 0 checks that
//! every rank runs the same configuration and hands out the collective library's unique id;
//! the collectives themselves over NCCL ([`nccl`], with a watchdog that names a failed rank);
//! and [`launch`], which starts a machine's ranks as `torchrun` does. Above the backends:
//! [`collectives`], what the trainer asks of one device or of a group, and [`data_parallel`],
//! a CUDA rank's group (the gathered loss, `--sync-bn`, the gradients summed in
//! [`gradient_buckets`] while the backward pass runs), registered as the graph's hooks.
//! The loss over the gathered global batch, in float64, is `loss::gathered`.

pub mod collectives;
pub mod data_parallel;
pub mod gradient_buckets;
pub mod launch;
pub mod nccl;
pub mod rendezvous;

use crate::error::{Error, Result};

/// One process's place in a data-parallel group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The GPU of this process on its machine.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// The variables a launcher sets, as `torchrun` names them.
pub const ENV_VARS: [&str; 5] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl DistEnv {
    /// From the process environment; None when `WORLD_SIZE` is unset (one process).
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// From `get(name)` for the variables of [`ENV_VARS`]: None without `WORLD_SIZE`; an error
    /// naming the variable, its value and what was expected for anything missing or wrong.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |name: &str, value: Option<String>, max: usize| -> Result<usize> {
            let value = value.ok_or_else(|| {
                Error::invalid(format!(
                    "{name} is not set: with WORLD_SIZE set, every one of {} is needed",
                    ENV_VARS.join(", ")
                ))
            })?;
            match value.trim().parse::<usize>() {
                Ok(v) if v <= max => Ok(v),
                _ => Err(Error::invalid(format!(
                    "{name}={value:?}: expected a whole number from 0 to {max}"
                ))),
            }
        };
        // More ranks than this is not a data-parallel group this crate could start.
        const MAX_WORLD: usize = 65_536;
        let world_size = number("WORLD_SIZE", Some(world), MAX_WORLD)?;
        if world_size == 0 {
            return Err(Error::invalid(
                "WORLD_SIZE=\"0\": expected at least 1 process",
            ));
        }
        let rank = number("RANK", get("RANK"), world_size - 1)?;
        let local_rank = number("LOCAL_RANK", get("LOCAL_RANK"), world_size - 1)?;
        let master_addr = get("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| {
                Error::invalid("MASTER_ADDR is not set: expected rank 0's host name or address")
            })?;
        let master_port = number("MASTER_PORT", get("MASTER_PORT"), u16::MAX as usize)?;
        if master_port == 0 {
            return Err(Error::invalid(
                "MASTER_PORT=\"0\": expected the fixed port rank 0 listens on (1 to 65535)",
            ));
        }
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            master_addr: master_addr.trim().to_string(),
            master_port: master_port as u16,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|name| map.get(name).cloned())
    }

    const GOOD: [(&str, &str); 5] = [
        ("RANK", "2"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
    ];

    #[test]
    fn a_launchers_variables_are_read() {
        assert_eq!(parse(&[]).unwrap(), None, "no WORLD_SIZE: one process");
        let env = parse(&GOOD).unwrap().unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank), (2, 4, 0));
        assert_eq!(
            (env.master_addr.as_str(), env.master_port),
            ("node0", 29500)
        );
    }

    #[test]
    fn wrong_or_missing_variables_are_named() {
        let with = |name: &str, value: Option<&str>| {
            let vars: Vec<(&str, &str)> = GOOD
                .iter()
                .copied()
                .filter(|(k, _)| *k != name)
                .chain(value.map(|v| (name, v)))
                .collect();
            parse(&vars).unwrap_err().to_string()
        };
        let err = with("RANK", Some("4"));
        assert!(
            err.contains("RANK=\"4\": expected a whole number from 0 to 3"),
            "{err}"
        );
        let err = with("RANK", None);
        assert!(err.contains("RANK is not set"), "{err}");
        let err = with("WORLD_SIZE", Some("two"));
        assert!(err.contains("WORLD_SIZE=\"two\""), "{err}");
        let err = with("WORLD_SIZE", Some("0"));
        assert!(err.contains("at least 1"), "{err}");
        let err = with("MASTER_PORT", Some("70000"));
        assert!(
            err.contains("MASTER_PORT=\"70000\": expected a whole number from 0 to 65535"),
            "{err}"
        );
        let err = with("MASTER_ADDR", Some(" "));
        assert!(err.contains("MASTER_ADDR is not set"), "{err}");
    }
}
