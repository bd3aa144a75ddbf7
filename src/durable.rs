//! Durable file writes: every file this crate writes goes to a temporary sibling, is synced,
//! renamed over its name and the directory synced, so a reader sees the old file or the new
//! one and never a part (a crash, a kill or a full disk in between leaves the old file).
//!
//! Temporaries are named `.<name>.tmp<pid>`; a run removes those left by a killed writer
//! ([`remove_leftovers`]) when it takes its folder.
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
    // Never renamed over a device node, FIFO, socket or folder (`--out /dev/null` as root).
    crate::files::check_output(path)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
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

/// Syncs the directory holding `path`, so that a rename into it is on disk too.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir)?.sync_all()
}

/// Removes the temporaries of writes that a killed process left in `dir` (`.<name>.tmp<pid>`);
/// the caller holds the folder (its run lock), so no live writer owns them. Returns how many.
pub fn remove_leftovers(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_tmp = name.starts_with('.')
            && name
                .rsplit_once(".tmp")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if is_tmp && entry.file_type().is_ok_and(|t| t.is_file()) {
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
        // A killed writer's temporary, and files that only look alike.
        fs::write(dir.join(".a.json.tmp12345"), b"half").unwrap();
        fs::write(dir.join(".lock"), b"1").unwrap();
        fs::write(dir.join("notes.tmp1"), b"mine").unwrap();
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert!(!dir.join(".a.json.tmp12345").exists());
        assert!(dir.join(".lock").exists() && dir.join("notes.tmp1").exists());
        // A write into a missing folder fails and leaves no temporary behind.
        assert!(write_atomically(&dir.join("no/such/dir.json"), b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
