//! The one guarded way to read a file a user hands the tool (checkpoints, configs, `.npy`
//! inputs, run folders' files) and to check where an output may go.
//!
//! - [`read_input`]: only a regular file (a FIFO, a device such as `/dev/zero`, a socket or a
//!   folder is refused by name, and a FIFO never blocks: it is opened without waiting for a
//!   writer, then checked), at most `max_bytes` (its size is checked before a byte is read, and
//!   the read stops past it should the file grow meanwhile), and within the memory the machine
//!   has ([`crate::limits::check_allocation`]).
//! - [`check_output`]: an output path may be a new file or a regular file (or a link, which a
//!   rename replaces), never a device node, FIFO, socket or folder. `durable::write_atomically`,
//!   which every writer uses, calls it first.

use std::fs;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Size bounds of the inputs (far above any file this tool writes, far below what would
/// exhaust a machine by accident).
pub mod max_bytes {
    /// A checkpoint or state file (ResNet18's is 45 MB, with momentum and a bank 200 MB).
    pub const CHECKPOINT: u64 = 4 << 30;
    /// A configuration or other JSON or CSV text file a run writes.
    pub const TEXT: u64 = 64 << 20;
    /// A `.npy` array (the memory check applies too).
    pub const ARRAY: u64 = 64 << 30;
}

/// What a path is, in words, for an error that says what was expected instead.
fn kind_of(ft: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a folder"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// The whole of the regular file `path` (`what` names it in errors: "checkpoint", "--config"),
/// at most `max` bytes.
pub fn read_input(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: opening a FIFO for reading waits for a writer otherwise; a regular file
    // ignores the flag. The type is checked on the open file, so a swap cannot slip past.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(Error::bad_file(
            path,
            format!(
                "the {what} is {}: expected a regular file",
                kind_of(&meta.file_type())
            ),
        ));
    }
    let len = meta.len();
    if len > max {
        return Err(Error::bad_file(
            path,
            format!(
                "the {what} has {len} bytes, more than the {max} a {what} may have: expected a file this tool wrote"
            ),
        ));
    }
    crate::limits::check_allocation(&format!("reading {}", path.display()), Some(len))?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(Error::bad_file(
            path,
            format!("the {what} grew past {max} bytes while it was read"),
        ));
    }
    Ok(bytes)
}

/// [`read_input`] of UTF-8 text.
pub fn read_input_text(path: &Path, what: &str, max: u64) -> Result<String> {
    String::from_utf8(read_input(path, what, max)?)
        .map_err(|e| Error::bad_file(path, format!("the {what} is not UTF-8 text: {e}")))
}

/// Whether `path` may be written (replaced by a rename): it does not exist, or it is a regular
/// file or a symbolic link; a device node, FIFO, socket or folder is refused by name.
pub fn check_output(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) => {
            let ft = meta.file_type();
            if ft.is_file() || ft.is_symlink() {
                Ok(())
            } else {
                Err(Error::invalid(format!(
                    "{} is {}: an output must be a new or a regular file",
                    path.display(),
                    kind_of(&ft)
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("invaspread-files-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn devices_fifos_and_folders_are_refused_without_blocking() {
        let dir = scratch("kinds");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo of a NUL-terminated path in our scratch folder.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (path, kind) in [
            (Path::new("/dev/zero"), "a character device"),
            (fifo.as_path(), "a FIFO"),
            (dir.as_path(), "a folder"),
        ] {
            let err = read_input(path, "checkpoint", max_bytes::CHECKPOINT)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(kind) && err.contains("expected a regular file"),
                "{err}"
            );
            if path != dir.as_path() {
                let err = check_output(path).unwrap_err().to_string();
                assert!(err.contains(kind), "{err}");
            }
        }
        let err = check_output(&dir).unwrap_err().to_string();
        assert!(err.contains("a folder"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn sizes_are_bounded_before_reading() {
        let dir = scratch("size");
        let f = dir.join("config.json");
        fs::write(&f, vec![b' '; 100]).unwrap();
        assert_eq!(read_input(&f, "config", 100).unwrap().len(), 100);
        let err = read_input(&f, "config", 99).unwrap_err().to_string();
        assert!(err.contains("has 100 bytes, more than the 99"), "{err}");
        assert!(check_output(&f).is_ok() && check_output(&dir.join("new")).is_ok());
        fs::write(&f, [0xff, 0xfe]).unwrap();
        let err = read_input_text(&f, "config", 100).unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
