//! Fault injection for the crate's own tests, compiled only with the `test-hooks` cargo feature
//! (`cargo test --features test-hooks`, what `.ci/run` runs): a release build without it has
//! none of these variables, so nothing a user sets can crash or stop a run. Without the
//! feature every hook is an empty function.
//!
//! - `INVASPREAD_CRASH_AT_WRITE=n`: the process aborts (as `kill -9` would end it) at the n-th
//!   write event of `durable`'s atomic writes, two per file: after the temporary is written and
//!   synced, and after the rename (tests/cli/crash.rs).
//! - `INVASPREAD_SIGNAL_AT_EVAL=1`: the first end-of-epoch evaluation begins as if SIGTERM had
//!   just arrived, so that a test can stop a run there at a known moment (tests/cli/signals.rs).

/// Whether this build has the hooks (the tests that need them say so when it has not).
pub const ENABLED: bool = cfg!(feature = "test-hooks");

#[cfg(feature = "test-hooks")]
mod enabled {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// The write events so far.
    static WRITE_EVENTS: AtomicU64 = AtomicU64::new(0);

    pub fn write_event() {
        static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        let at = AT.get_or_init(|| {
            std::env::var("INVASPREAD_CRASH_AT_WRITE")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        if let Some(at) = *at {
            if WRITE_EVENTS.fetch_add(1, Ordering::SeqCst) + 1 == at {
                eprintln!("INVASPREAD_CRASH_AT_WRITE={at}: aborting at this write");
                std::process::abort();
            }
        }
    }

    pub fn signal_at_evaluation() -> bool {
        static DONE: AtomicBool = AtomicBool::new(false);
        std::env::var("INVASPREAD_SIGNAL_AT_EVAL").is_ok_and(|v| v == "1")
            && !DONE.swap(true, Ordering::SeqCst)
    }
}

/// A write event of `durable::write_atomically`: aborts the process at the one
/// `INVASPREAD_CRASH_AT_WRITE` names.
#[inline]
pub fn write_event() {
    #[cfg(feature = "test-hooks")]
    enabled::write_event();
}

/// Whether this evaluation should begin as if SIGTERM had arrived (`INVASPREAD_SIGNAL_AT_EVAL`,
/// once per process).
#[inline]
pub fn signal_at_evaluation() -> bool {
    #[cfg(feature = "test-hooks")]
    return enabled::signal_at_evaluation();
    #[cfg(not(feature = "test-hooks"))]
    false
}
