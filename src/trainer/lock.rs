//! One writer per run directory: an advisory lock (`flock`) on `--out/.lock`, held while a run
//! writes there. The kernel releases it when the process ends, by a crash or a kill too, so a
//! stale lock never blocks a resume; a second training into the same folder meanwhile is
//! refused with the holder's process id, instead of both interleaving their files.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// Held for as long as it lives.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the lock of the run directory `out` (which exists), or says who holds it.
    pub fn acquire(out: &Path) -> Result<RunLock> {
        let path = out.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // SAFETY: flock on a descriptor this function owns; LOCK_NB makes it return at once.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !taken {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder: String = holder.trim().chars().take(40).collect();
            return Err(Error::invalid(format!(
                "{} is in use by another training (process {}, which holds {}); wait for it \
                 to finish or choose another --out",
                out.display(),
                if holder.is_empty() {
                    "unknown".into()
                } else {
                    holder
                },
                path.display()
            )));
        }
        // Who holds it, for the message above; the lock, not this text, is what counts.
        file.set_len(0).map_err(|e| Error::io(&path, e))?;
        write!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
        Ok(RunLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_until_the_first_lets_go() {
        let dir = std::env::temp_dir().join(format!("invaspread-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = RunLock::acquire(&dir).unwrap();
        // flock locks belong to the open file description: a second open is a second writer.
        let err = RunLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            err.contains("in use by another training")
                && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(first);
        let again = RunLock::acquire(&dir);
        assert!(again.is_ok(), "{again:?}");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
