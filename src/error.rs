//! The crate's error type. Every message names what was wrong, the value, and what was expected.

use std::path::{Path, PathBuf};

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value outside what the operation accepts (a hyper-parameter, a shape, a non-finite entry).
    #[error("{0}")]
    InvalidInput(String),
    /// A file whose contents are not what was expected.
    #[error("{}: {message}", path.display())]
    BadFile { path: PathBuf, message: String },
    /// The operating system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A CUDA driver call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// The binary was built without nvcc, so there is nothing to load.
    #[error("CUDA kernels were not built into this binary ({0}); install the compiler with scripts/install-cuda-compiler and rebuild")]
    KernelsNotBuilt(&'static str),
    /// `--device cuda` on a machine without a usable GPU.
    #[error("no CUDA device is available: {0}")]
    NoDevice(String),
    /// A value that became NaN or infinite (an input's entry, a loss, a parameter): the trainer
    /// reports it as divergence at its step.
    #[error("{0}")]
    NonFinite(String),
    /// Another rank of a data-parallel group died, hung past the timeout, or called another
    /// collective: the message names the rank where it is known.
    #[error("data-parallel group: {0}")]
    Peer(String),
    /// A run stopped by a signal, its state saved: not a failure of the input, but the process
    /// must not report success (exit status 128 + signal).
    #[error("{message}")]
    Interrupted { signal: i32, message: String },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    pub fn bad_file(path: &Path, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.to_path_buf(),
            message: msg.into(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Attaches a file name to an input error found after the file was read.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            Error::InvalidInput(message) | Error::NonFinite(message) => Error::BadFile {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        }
    }
}

/// At most the first 60 characters of a piece of bad input, quoted, with its length when cut:
/// what an error message quotes, so that a hostile file cannot make the message itself huge.
pub fn excerpt(text: &str) -> String {
    const SHOWN: usize = 60;
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(SHOWN).collect();
    if chars.next().is_none() {
        format!("{head:?}")
    } else {
        format!("{head:?}... ({} bytes)", text.len())
    }
}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}
