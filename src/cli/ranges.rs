//! clap value parsers for the numeric flags, from the ranges of [`invaspread::limits`]: a value
//! outside its range is a usage error (exit status 2) naming the flag, the value and the range,
//! before anything runs.

use invaspread::limits::{self, Count, Real};

fn real(range: &Real, s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("not a number; expected {}", range.describe()))?;
    range
        .check(v)
        .map_err(|_| format!("expected {} ({})", range.describe(), range.why))
}

fn count(range: &Count, s: &str) -> Result<u64, String> {
    let v: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("not a whole number; expected {}", range.describe()))?;
    range
        .check(v)
        .map_err(|_| format!("expected {} ({})", range.describe(), range.why))
}

macro_rules! parsers {
    ($(real $name:ident = $range:path;)* $(count $cname:ident = $crange:path;)*) => {
        $(pub fn $name(s: &str) -> Result<f64, String> { real(&$range, s) })*
        $(pub fn $cname(s: &str) -> Result<usize, String> { count(&$crange, s).map(|v| v as usize) })*
    };
}

parsers! {
    real tau = limits::TAU;
    real mu = limits::MU;
    real lr = limits::LR;
    real momentum = limits::MOMENTUM;
    real weight_decay = limits::WEIGHT_DECAY;
    real sigma = limits::SIGMA;
    real negative_fraction = limits::NEGATIVE_FRACTION;
    real min_seconds = limits::MIN_SECONDS;
    real bucket_mb = limits::BUCKET_MB;
    count k = limits::K;
    count eval_every = limits::EVAL_EVERY;
    count batch = limits::BATCH;
    count epochs = limits::EPOCHS;
    count steps = limits::STEPS;
    count warmup_steps = limits::WARMUP_STEPS;
    count image_size = limits::IMAGE_SIZE;
    count threads = limits::THREADS;
    count rows = limits::ROWS;
    count dim = limits::DIM;
    count bench_batch = limits::BENCH_BATCH;
    count bench_steps = limits::BENCH_STEPS;
}

/// Epochs of the step schedule, as `--milestones` gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Milestones(pub Vec<usize>);

/// `--milestones E1,E2,...`: epochs in increasing order, each in its range.
pub fn milestones(s: &str) -> Result<Milestones, String> {
    let epochs = s
        .split(',')
        .map(|e| count(&limits::MILESTONE, e).map(|v| v as usize))
        .collect::<Result<Vec<usize>, String>>()
        .map_err(|e| format!("{:?}: {e}", s.trim()))?;
    if epochs.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "{s:?}: expected epochs in increasing order, e.g. 120,160"
        ));
    }
    Ok(Milestones(epochs))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use invaspread::limits::{self, Count, Real};

    enum Range {
        Real(Real),
        Count(Count),
    }

    /// (subcommand, flag, range) of every ranged flag.
    fn table() -> Vec<(&'static str, &'static str, Range)> {
        use Range::{Count as C, Real as R};
        vec![
            ("train", "lr", R(limits::LR)),
            ("train", "momentum", R(limits::MOMENTUM)),
            ("train", "weight-decay", R(limits::WEIGHT_DECAY)),
            ("train", "tau", R(limits::TAU)),
            ("train", "mu", R(limits::MU)),
            ("train", "sigma", R(limits::SIGMA)),
            ("train", "negative-fraction", R(limits::NEGATIVE_FRACTION)),
            ("loss", "negative-fraction", R(limits::NEGATIVE_FRACTION)),
            ("train", "k", C(limits::K)),
            ("train", "eval-every", C(limits::EVAL_EVERY)),
            ("train", "batch", C(limits::BATCH)),
            ("train", "epochs", C(limits::EPOCHS)),
            ("train", "steps", C(limits::STEPS)),
            ("train", "warmup-steps", C(limits::WARMUP_STEPS)),
            ("train", "image-size", C(limits::IMAGE_SIZE)),
            ("", "threads", C(limits::THREADS)),
            ("eval", "k", C(limits::K)),
            ("eval", "sigma", R(limits::SIGMA)),
            ("loss", "tau", R(limits::TAU)),
            ("loss", "mu", R(limits::MU)),
            ("random", "n", C(limits::ROWS)),
            ("random", "d", C(limits::DIM)),
            ("step", "lr", R(limits::LR)),
            ("step", "tau", R(limits::TAU)),
            ("bench-loss", "n", C(limits::ROWS)),
            ("bench-loss", "d", C(limits::DIM)),
            ("bench-loss", "tau", R(limits::TAU)),
            ("bench-loss", "min-seconds", R(limits::MIN_SECONDS)),
            ("bench-train", "batch", C(limits::BENCH_BATCH)),
            ("bench-train", "steps", C(limits::BENCH_STEPS)),
        ]
    }

    #[test]
    fn every_ranged_flag_states_its_range_in_help_and_refuses_values_outside_it() {
        for (sub, flag, range) in table() {
            // "" is the top level, where the global flags are.
            let mut cmd = crate::cli::Cli::command();
            let help = if sub.is_empty() {
                cmd.render_long_help().to_string()
            } else {
                cmd.find_subcommand_mut(sub)
                    .unwrap_or_else(|| panic!("no subcommand {sub}"))
                    .render_long_help()
                    .to_string()
            };
            let (describe, outside, inside) = match &range {
                Range::Real(r) => (
                    r.describe(),
                    vec![
                        format!("{}", r.min - 1e-3),
                        format!("{}", r.max * 2.0 + 1.0),
                        "nan".into(),
                    ],
                    format!(
                        "{}",
                        if r.min_open {
                            (r.min + r.max) / 2.0
                        } else {
                            r.min
                        }
                    ),
                ),
                Range::Count(c) => {
                    let mut out = vec![format!("{}", c.max + 1), "x".into()];
                    if c.min > 0 {
                        out.push(format!("{}", c.min - 1));
                    }
                    (c.describe(), out, format!("{}", c.min))
                }
            };
            assert!(
                help.contains(&format!("[{describe}]")),
                "{sub} --{flag}: the help does not state [{describe}]"
            );
            for bad in outside {
                let args = ["invaspread", sub, &format!("--{flag}={bad}")];
                let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
                let err = crate::cli::Cli::command()
                    .try_get_matches_from(args)
                    .unwrap_err();
                assert_eq!(
                    err.kind(),
                    clap::error::ErrorKind::ValueValidation,
                    "{sub} --{flag} {bad}: {err}"
                );
            }
            let args = ["invaspread", sub, &format!("--{flag}"), &inside];
            let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
            if let Err(err) = crate::cli::Cli::command().try_get_matches_from(args) {
                assert_ne!(
                    err.kind(),
                    clap::error::ErrorKind::ValueValidation,
                    "{sub} --{flag} {inside}: {err}"
                );
            }
        }
    }
}
