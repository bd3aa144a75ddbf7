//! Durable file writes: every file this crate writes goes to a temporary sibling, is synced,
//! renamed over its name and the directory synced, so a reader sees the old file or the new
//! one and never a part (a crash, a kill or a full disk in between leaves the old file).
//!
//! Temporaries are named `.invaspread-tmp-<name>-<pid>-<random>`: created new (never through a
//! link or over a file someone planted), their name unguessable, and a run removes only names
//! with that prefix when it takes its folder ([`remove_leftovers`]), never a user's own
//! `notes.tmp1` or `.draft.tmp2`.
//!
//! Each write has two events for the crash-consistency test's fault injection
//! ([`crate::test_hooks`], only in builds with the `test-hooks` feature): after the temporary
//! is written and synced, and after the rename.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to a temporary sibling of `path`, syncs it, renames it over `path` and syncs
/// the directory. On an error (a full disk) the temporary is removed and `path` is untouched.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    // Never renamed over a device node, FIFO, socket or folder (`--out /dev/null` as root),
    // over an input of this command, or over a file of another kind.
    crate::files::check_output(path)?;
    crate::files::check_replaces(path, bytes)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(TMP_PREFIX);
    tmp_name.push(file_name);
    tmp_name.push(format!("-{}-{:016x}", std::process::id(), unguessable()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        crate::test_hooks::write_event();
        fs::rename(&tmp, path)?;
        crate::test_hooks::write_event();
        sync_dir(path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// The start of every temporary's name.
const TMP_PREFIX: &str = ".invaspread-tmp-";

/// 64 bits no other process can predict: std's per-process random hash keys (seeded from the
/// operating system), mixed with a counter so two writes of one process differ.
fn unguessable() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Syncs the directory holding `path`, so that a rename into it is on disk too.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir)?.sync_all()
}

/// Removes the temporaries of writes that a killed process left in `dir` (names that start
/// with [`TMP_PREFIX`], regular files only); the caller holds the folder (its run lock), so no
/// live writer owns them. Returns how many.
pub fn remove_leftovers(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TMP_PREFIX) && entry.file_type().is_ok_and(|t| t.is_file()) {
            fs::remove_file(entry.path()).map_err(|e| Error::io(&entry.path(), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_whole_and_leftovers_are_removed() {
        let dir = std::env::temp_dir().join(format!("invaspread-durable-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.json");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        // A killed writer's temporary, and files that only look alike (the names of the
        // temporaries before they had a prefix of their own included).
        let killed = dir.join(".invaspread-tmp-a.json-12345-0123456789abcdef");
        fs::write(&killed, b"half").unwrap();
        let mine = [".lock", "notes.tmp1", ".a.json.tmp12345", ".draft.tmp2"];
        for name in mine {
            fs::write(dir.join(name), b"mine").unwrap();
        }
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert!(!killed.exists());
        assert!(mine.iter().all(|name| dir.join(name).exists()));
        // Two writes of one process use different temporaries.
        assert_ne!(unguessable(), unguessable());
        // A write into a missing folder fails and leaves no temporary behind.
        assert!(write_atomically(&dir.join("no/such/dir.json"), b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
