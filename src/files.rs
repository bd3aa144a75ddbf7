//! The one guarded way to read a file a user hands the tool (checkpoints, configs, `.npy`
//! inputs, run folders' files) and to check where an output may go.
//!
//! - [`read_input`]: only a regular file (a FIFO, a device such as `/dev/zero`, a socket or a
//!   folder is refused by name, and a FIFO never blocks: it is opened without waiting for a
//!   writer, then checked), at most `max_bytes` (its size is checked before a byte is read, and
//!   the read stops past it should the file grow meanwhile), and within the memory the machine
//!   has ([`crate::limits::check_allocation`]).
//! - [`check_output`]: an output path may be a new file or a regular file (or a link, which a
//!   rename replaces), never a device node, FIFO, socket or folder, and never a file this
//!   command read: within an [`InputScope`] (the command line opens one per command) every
//!   [`read_input`] is remembered (by device and inode, so `./x`, a hard
//!   link or another spelling of the path count too) until [`forget_inputs_in`] hands a
//!   folder's files back to the command that owns them (a resumed run rewrites its own state).
//! - [`check_replaces`]: an existing output is replaced only by a file of its own kind (a PNG
//!   by a PNG, a checkpoint by a checkpoint), so `plot --out run/state.safetensors` cannot
//!   destroy a run.
//!
//! `durable::write_atomically`, which every writer uses, calls both first.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
    remember_input(path, &meta, what);
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

/// A file this command has read: its identity, the folder it lies in (canonical) and what it
/// was, for the error of an output that would replace it.
struct Input {
    device: u64,
    inode: u64,
    folder: Option<PathBuf>,
    what: String,
}

/// The inputs the command being run has read ([`read_input`]), until [`forget_inputs_in`];
/// None outside a command's [`InputScope`] (a library caller may read a file and later save
/// over it, as a training script does with its checkpoint).
static INPUTS: Mutex<Option<Vec<Input>>> = Mutex::new(None);

fn inputs() -> std::sync::MutexGuard<'static, Option<Vec<Input>>> {
    // A panic elsewhere while the list was held leaves it whole: entries are pushed or
    // retained only.
    INPUTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// While held, the files read are this command's inputs, which no output may replace. The
/// command line holds one around each command.
pub struct InputScope(());

impl InputScope {
    pub fn begin() -> InputScope {
        *inputs() = Some(Vec::new());
        InputScope(())
    }
}

impl Drop for InputScope {
    fn drop(&mut self) {
        *inputs() = None;
    }
}

fn remember_input(path: &Path, meta: &fs::Metadata, what: &str) {
    // The folder the name lies in (a link's own folder, not its target's): a run folder whose
    // config.json links to a shared file still owns that name.
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.canonicalize().ok(),
        _ => Path::new(".").canonicalize().ok(),
    };
    let mut guard = inputs();
    let Some(list) = guard.as_mut() else {
        return;
    };
    if !list
        .iter()
        .any(|i| i.device == meta.dev() && i.inode == meta.ino())
    {
        list.push(Input {
            device: meta.dev(),
            inode: meta.ino(),
            folder,
            what: what.to_string(),
        });
    }
}

/// Hands the files read from `folder` back to the command: a resumed run read its own
/// state, configuration and metrics there and rewrites them by design.
pub fn forget_inputs_in(folder: &Path) {
    let Ok(folder) = folder.canonicalize() else {
        return;
    };
    if let Some(list) = inputs().as_mut() {
        list.retain(|i| i.folder.as_deref() != Some(folder.as_path()));
    }
}

/// Whether `path` may be written (replaced by a rename): it does not exist, or it is a regular
/// file or a symbolic link; a device node, FIFO, socket or folder is refused by name, and so is
/// a file this command read.
pub fn check_output(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) => {
            let ft = meta.file_type();
            // The path itself, or the file a link there points to (the rename would spare the
            // input, but the link the user named would no longer lead to it).
            let target = fs::metadata(path).ok();
            let same = |i: &Input, m: &fs::Metadata| i.device == m.dev() && i.inode == m.ino();
            if let Some(input) = inputs()
                .iter()
                .flatten()
                .find(|i| same(i, &meta) || target.as_ref().is_some_and(|t| same(i, t)))
            {
                return Err(Error::invalid(format!(
                    "{} is the {} this command reads: writing there would replace it; choose another output path",
                    path.display(),
                    input.what
                )));
            }
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

/// The kinds of file this tool writes, told apart by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Png,
    Npy,
    Safetensors,
    Json,
    /// CSV, Markdown or other UTF-8 text.
    Text,
    /// Anything else: a file this tool never writes.
    Other,
}

impl Kind {
    fn of(head: &[u8]) -> Kind {
        if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            return Kind::Png;
        }
        if head.starts_with(b"\x93NUMPY") {
            return Kind::Npy;
        }
        // safetensors: a little-endian u64 header length, then the JSON header.
        if head.len() > 8 && head[8] == b'{' {
            return Kind::Safetensors;
        }
        let text = match std::str::from_utf8(head) {
            Ok(t) => t,
            // A multi-byte character cut at the end of the head is still text.
            Err(e) if e.error_len().is_none() => {
                std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default()
            }
            Err(_) => return Kind::Other,
        };
        if text.contains('\0') {
            return Kind::Other;
        }
        match text.trim_start().chars().next() {
            Some('{') | Some('[') => Kind::Json,
            _ => Kind::Text,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Png => "a PNG image",
            Kind::Npy => "a .npy array",
            Kind::Safetensors => "a safetensors checkpoint",
            Kind::Json => "JSON",
            Kind::Text => "text",
            Kind::Other => "a file of another kind",
        }
    }
}

/// How many leading bytes tell a file's [`Kind`].
const HEAD: usize = 64;

/// Whether `new` may replace the file at `path`: a missing or empty file, a symbolic link (the
/// rename replaces the link, not its target) or a file of the same kind as `new`. A user's
/// checkpoint, array or notes never give way to a plot or a table written onto them by mistake.
pub fn check_replaces(path: &Path, new: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() && meta.len() > 0 => {}
        _ => return Ok(()),
    }
    let mut head = Vec::with_capacity(HEAD);
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .and_then(|f| f.take(HEAD as u64).read_to_end(&mut head))
        .map_err(|e| Error::io(path, e))?;
    let (was, now) = (Kind::of(&head), Kind::of(&new[..new.len().min(HEAD)]));
    if was == now && was != Kind::Other {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{} holds {}, and this would replace it with {}: an output replaces only a file of its own kind; choose another path, or remove the file first",
        path.display(),
        was.describe(),
        now.describe()
    )))
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

    #[test]
    fn an_output_replaces_only_a_file_of_its_own_kind() {
        let dir = scratch("kinds-of-output");
        let png = b"\x89PNG\r\n\x1a\nrest";
        let st = b"\x10\0\0\0\0\0\0\0{\"a\":1}";
        for (head, kind) in [
            (&png[..], Kind::Png),
            (b"\x93NUMPY\x01\x00", Kind::Npy),
            (&st[..], Kind::Safetensors),
            (b"  {\"x\": 1}", Kind::Json),
            (b"epoch,step\n0,0\n", Kind::Text),
            ("caf\u{e9}".as_bytes(), Kind::Text),
            (b"\x00\x01\x02\xff", Kind::Other),
        ] {
            assert_eq!(Kind::of(head), kind, "{head:?}");
        }
        let f = dir.join("out");
        assert!(check_replaces(&f, png).is_ok(), "a new file");
        fs::write(&f, b"").unwrap();
        assert!(check_replaces(&f, png).is_ok(), "an empty file");
        fs::write(&f, png).unwrap();
        assert!(check_replaces(&f, png).is_ok(), "a PNG by a PNG");
        let err = check_replaces(&f, st).unwrap_err().to_string();
        assert!(
            err.contains("holds a PNG image, and this would replace it with a safetensors"),
            "{err}"
        );
        fs::write(&f, b"\x00\x01binary").unwrap();
        assert!(
            check_replaces(&f, b"\x00\x02other").is_err(),
            "unknown kinds never"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
