//! Helpers shared by the integration tests that run the `invaspread` binary.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs the binary under test; `INVASPREAD_EXE` overrides the build path (scripts/device-check.sh
/// runs these tests on a machine where the build folder does not exist).
pub fn invaspread(args: &[&str]) -> Output {
    let exe = std::env::var("INVASPREAD_EXE")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_invaspread").to_string());
    Command::new(exe)
        .args(args)
        .output()
        .expect("run invaspread")
}

/// The repository root; `INVASPREAD_REPO` overrides it for the same reason.
#[allow(dead_code)] // not every test file needs it
pub fn repo() -> PathBuf {
    std::env::var_os("INVASPREAD_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
