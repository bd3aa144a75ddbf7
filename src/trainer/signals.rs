//! SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends) for a training run, in every
//! phase:
//!
//! - before the first step (loading the data, the first evaluation) there is nothing to save:
//!   the process ends at once;
//! - while training, the run stops after the step in progress, saves its state and ends;
//! - a second signal ends the process at once (the last committed state stays as it was).
//!
//! An interrupted run ends with status 128 + the signal (130 for SIGINT, 143 for SIGTERM),
//! a finished one with 0. A watcher thread (signal-hook's iterator) acts on the signals, so
//! nothing async-signal-unsafe runs in a handler.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

use super::stop_flag;
use crate::error::{Error, Result};

/// Whether a signal now may end the process at once (nothing to save yet).
static NOTHING_TO_SAVE: AtomicBool = AtomicBool::new(true);
/// The first signal received, or 0.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The name users know a signal by.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT (Ctrl-C)",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Starts watching SIGINT and SIGTERM (once per process).
pub fn install() -> Result<()> {
    static INSTALLED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
                .map_err(|e| format!("cannot watch SIGINT and SIGTERM: {e}"))?;
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    for signal in signals.forever() {
                        on_signal(signal);
                    }
                })
                .map_err(|e| format!("cannot start the signal thread: {e}"))?;
            Ok(())
        })
        .clone()
        .map_err(Error::invalid)
}

fn on_signal(signal: i32) {
    let first = RECEIVED
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    stop_flag().store(true, Ordering::SeqCst);
    if NOTHING_TO_SAVE.load(Ordering::SeqCst) {
        eprintln!(
            "\ninterrupted by {} before training started: nothing to save",
            signal_name(signal)
        );
        std::process::exit(128 + signal);
    }
    if !first {
        eprintln!(
            "\ninterrupted again by {}: stopping without saving; the last saved state is kept",
            signal_name(signal)
        );
        std::process::exit(128 + signal);
    }
    eprintln!(
        "\n{} received: stopping after this step and saving",
        signal_name(signal)
    );
}

/// At the start of an end-of-epoch evaluation: a test hook ([`crate::test_hooks`]) may deliver
/// SIGTERM here, as the watcher delivers it.
pub fn hook_at_evaluation() {
    if crate::test_hooks::signal_at_evaluation() {
        on_signal(SIGTERM);
    }
}

/// Whether a signal from now on should stop the run after a step and save (true), or end the
/// process at once (false: nothing is worth saving yet).
pub fn set_saving(saving: bool) {
    NOTHING_TO_SAVE.store(!saving, Ordering::SeqCst);
}

/// The first signal received, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
