//! The range of every numeric setting, in one place: the command line's parsers (`src/cli`)
//! reject a value outside it before anything runs, and the same ranges validate a replayed
//! `config.json` and library callers, so that no path accepts what another refuses. Each range
//! says why it ends where it does; the `--help` text of each flag states it (a test in
//! `src/cli` compares the two).
//!
//! Sizes that become allocations (N x d of `random`, the decoded dataset) are checked against
//! the memory the machine has before anything is allocated: [`check_allocation`].

use crate::error::{Error, Result};

/// A range of real numbers, each end open or closed.
#[derive(Debug, Clone, Copy)]
pub struct Real {
    /// The flag, without `--`.
    pub flag: &'static str,
    /// Where it lives in config.json, when it is part of a run's configuration.
    pub field: Option<&'static str>,
    pub min: f64,
    pub min_open: bool,
    pub max: f64,
    pub max_open: bool,
    pub why: &'static str,
}

impl Real {
    /// `0 < lr <= 10`: the range as the help text states it.
    pub fn describe(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.min,
            if self.min_open { "<" } else { "<=" },
            self.flag,
            if self.max_open { "<" } else { "<=" },
            self.max
        )
    }

    pub fn contains(&self, v: f64) -> bool {
        let above = if self.min_open {
            v > self.min
        } else {
            v >= self.min
        };
        let below = if self.max_open {
            v < self.max
        } else {
            v <= self.max
        };
        v.is_finite() && above && below
    }

    /// `v`, or an error naming the flag (and the config field), the value and the range.
    pub fn check(&self, v: f64) -> Result<f64> {
        if self.contains(v) {
            Ok(v)
        } else {
            Err(out_of_range(
                self.flag,
                self.field,
                &v,
                &self.describe(),
                self.why,
            ))
        }
    }
}

/// A range of counts, both ends closed.
#[derive(Debug, Clone, Copy)]
pub struct Count {
    pub flag: &'static str,
    pub field: Option<&'static str>,
    pub min: u64,
    pub max: u64,
    pub why: &'static str,
}

impl Count {
    pub fn describe(&self) -> String {
        format!("{} <= {} <= {}", self.min, self.flag, self.max)
    }

    pub fn check(&self, v: u64) -> Result<u64> {
        if (self.min..=self.max).contains(&v) {
            Ok(v)
        } else {
            Err(out_of_range(
                self.flag,
                self.field,
                &v,
                &self.describe(),
                self.why,
            ))
        }
    }

    /// [`Count::check`] for a `usize`.
    pub fn check_usize(&self, v: usize) -> Result<usize> {
        self.check(v as u64).map(|v| v as usize)
    }
}

fn flag_name(flag: &str) -> String {
    format!("--{}", flag.replace('_', "-"))
}

/// The error for `value` outside a range: the flag, the config field, the value, the range, why.
fn out_of_range(
    flag: &str,
    field: Option<&str>,
    value: &dyn std::fmt::Display,
    range: &str,
    why: &str,
) -> Error {
    let field = field.map_or(String::new(), |f| format!(" ({f} in config.json)"));
    Error::invalid(format!(
        "{}{field} = {value}: expected {range} ({why})",
        flag_name(flag)
    ))
}

macro_rules! real {
    ($name:ident, $flag:literal, $field:expr, $min:literal $lo:tt x $hi:tt $max:literal, $why:literal) => {
        pub const $name: Real = Real {
            flag: $flag,
            field: $field,
            min: $min,
    min_open: real!(@open $lo),
            max: $max,
    max_open: real!(@open $hi),
            why: $why,
        };
    };
    (@open <) => {
        true
    };
    (@open <=) => {
        false
    };
}

macro_rules! count {
    ($name:ident, $flag:literal, $field:expr, $min:literal ..= $max:literal, $why:literal) => {
        pub const $name: Count = Count {
            flag: $flag,
            field: $field,
            min: $min,
            max: $max,
            why: $why,
        };
    };
}

// The loss (loss.md, "Numerics").
real!(TAU, "tau", Some("loss.tau"), 0.025 <= x <= 100.0,
      "below 0.025 every term of a row can underflow in float32, and the loss turns infinite");
real!(MU, "mu", Some("loss.mu"), 1.0 <= x <= 1000.0,
      "the weight of the negatives; above 1000 float32 drifts from float64 by more than 1e-5");

real!(NEGATIVE_FRACTION, "negative_fraction", Some("loss.negatives.fraction"), 0.0 < x <= 1.0,
      "the share of each query's negatives kept by --negatives hard|easy; 0.5 in the paper");

// SGD.
real!(LR, "lr", Some("sgd.lr"), 0.0 < x <= 10.0, "a learning rate; 0.03 in the recipe");
real!(MOMENTUM, "momentum", Some("sgd.momentum"), 0.0 <= x < 1.0,
      "1 or more makes the velocity grow without bound");
real!(WEIGHT_DECAY, "weight_decay", Some("sgd.weight_decay"), 0.0 <= x < 1.0,
      "5e-4 in the recipe; 1 or more shrinks every weight to 0 or past it in one step");

// The kNN evaluation.
real!(SIGMA, "sigma", Some("knn.sigma"), 0.001 <= x <= 100.0,
      "the temperature of the kNN vote, 0.1 in the paper; below 0.001 exp(s / sigma) overflows");
count!(
    K,
    "k",
    Some("knn.k"),
    1..=100_000,
    "neighbours of the kNN vote, 200 in the paper"
);
count!(
    EVAL_EVERY,
    "eval_every",
    Some("knn.every"),
    1..=1_000_000,
    "epochs between kNN evaluations (the last epoch is always evaluated)"
);
count!(
    MILESTONE,
    "milestones",
    Some("schedule.milestones"),
    1..=1_000_000,
    "the epochs at which the step schedule multiplies the learning rate by 0.1"
);

// The run.
count!(
    BATCH,
    "batch",
    Some("batch"),
    2..=65_536,
    "images per step (2 x batch rows): the loss needs 2 images at least"
);
count!(
    EPOCHS,
    "epochs",
    Some("epochs"),
    0..=1_000_000,
    "passes over the training split"
);
count!(
    STEPS,
    "steps",
    Some("steps"),
    0..=1_000_000_000,
    "training steps"
);
count!(
    WARMUP_STEPS,
    "warmup_steps",
    Some("warmup_steps"),
    0..=1_000_000_000,
    "steps of linear warm-up"
);
count!(
    IMAGE_SIZE,
    "image_size",
    Some("data.image_size"),
    1..=1024,
    "the side of the square images the encoder sees"
);
count!(THREADS, "threads", None, 1..=1024, "CPU worker threads");

// Benchmarks and tools.
count!(ROWS, "n", None, 2..=16_777_216, "rows (N = 2 x images)");
count!(DIM, "d", None, 1..=65_536, "the embedding dimension");
count!(
    BENCH_BATCH,
    "batch",
    None,
    2..=4096,
    "images per timed step"
);
count!(
    BENCH_STEPS,
    "steps",
    None,
    1..=100_000,
    "timed steps per repetition"
);
real!(MIN_SECONDS, "min_seconds", None, 0.0 <= x <= 3600.0, "seconds each measurement repeats for");

// Data-parallel training.
real!(BUCKET_MB, "bucket_mb", None, 0.0 < x <= 4096.0,
      "MiB of parameter gradients per all-reduce; 25 as PyTorch DDP's bucket_cap_mb");

/// The memory this process can be given now: the least of the machine's MemAvailable
/// (/proc/meminfo), its cgroup's limit less its usage (cgroup v2 `memory.max`, v1
/// `memory.limit_in_bytes`), and its address-space limit (`ulimit -v`, RLIMIT_AS) less its
/// size; `None` where none of them can be read.
pub fn available_memory() -> Option<u64> {
    [
        meminfo_available(),
        cgroup_headroom(),
        address_space_headroom(),
    ]
    .into_iter()
    .flatten()
    .min()
}

fn meminfo_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Limit less usage of the process's cgroup (v2, else v1), or of the namespace's root one;
/// `max` (v2) and v1's "no limit" (about 2^63) are no limit.
fn cgroup_headroom() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates: Vec<(String, &str, &str)> = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        // A line of another shape is skipped, not the whole file (the root fallbacks below).
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            candidates.push((
                format!("/sys/fs/cgroup{path}"),
                "memory.max",
                "memory.current",
            ));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push((
                format!("/sys/fs/cgroup/memory{path}"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ));
        }
    }
    candidates.push(("/sys/fs/cgroup".into(), "memory.max", "memory.current"));
    candidates.push((
        "/sys/fs/cgroup/memory".into(),
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
    ));
    candidates.into_iter().find_map(|(dir, limit, usage)| {
        let limit = read_number(&format!("{dir}/{limit}"))?;
        if limit >= 1 << 62 {
            return None;
        }
        let usage = read_number(&format!("{dir}/{usage}")).unwrap_or(0);
        Some(limit.saturating_sub(usage))
    })
}

/// RLIMIT_AS less the process's virtual size (VmSize), when a limit is set.
fn address_space_headroom() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmSize:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(limit.rlim_cur.saturating_sub(kib.saturating_mul(1024)))
}

/// An error naming `what` when `bytes` (None: the size overflowed) is more than the machine
/// has available: a clear refusal instead of an abort in the allocator.
pub fn check_allocation(what: &str, bytes: Option<u64>) -> Result<()> {
    let available = available_memory();
    match (bytes, available) {
        (None, _) => Err(Error::invalid(format!(
            "{what}: the size overflows 64 bits"
        ))),
        (Some(b), Some(a)) if b > a => Err(Error::invalid(format!(
            "{what}: needs {:.1} GB, more than the {:.1} GB of memory available",
            b as f64 / 1e9,
            a as f64 / 1e9
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_the_flag_the_field_the_value_and_why() {
        assert_eq!(LR.describe(), "0 < lr <= 10");
        assert_eq!(MOMENTUM.describe(), "0 <= momentum < 1");
        for bad in [f64::NAN, f64::INFINITY, -0.1, 0.0, 10.5] {
            let e = LR.check(bad).unwrap_err().to_string();
            assert!(
                e.contains("--lr (sgd.lr in config.json) = ") && e.contains("0 < lr <= 10"),
                "{e}"
            );
        }
        assert_eq!(LR.check(0.03).unwrap(), 0.03);
        assert!(MOMENTUM.check(1.0).is_err() && MOMENTUM.check(0.0).is_ok());
        let e = WARMUP_STEPS.check(2_000_000_000).unwrap_err().to_string();
        assert!(e.contains("--warmup-steps"), "{e}");
        assert!(IMAGE_SIZE.check_usize(0).is_err() && IMAGE_SIZE.check_usize(32).is_ok());
        let e = check_allocation("random --n 1e12", Some(u64::MAX / 2))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("random --n 1e12: needs") || available_memory().is_none(),
            "{e}"
        );
        assert!(check_allocation("x", None).is_err());
    }
}
