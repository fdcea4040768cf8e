//! Credential files read as files: a key, a credential configuration or a subject token is a
//! regular file outside the kernel's pseudo-filesystems, opened without blocking and read to at
//! most [`MAX_CREDENTIAL_FILE`] bytes. A FIFO would hang the read, a device never end, and
//! `/proc/self/environ` would be sent to Google as a token.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The largest credential file read: service-account keys are about 2.3 KiB, credential
/// configurations under 1 KiB, projected ServiceAccount tokens 1 to 2 KiB.
pub const MAX_CREDENTIAL_FILE: u64 = 64 * 1024;

/// Longest wait for a read made from the async runtime (a file on a stalled network mount).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// `O_NONBLOCK` of Linux's generic ABI (x86, x86_64, arm, aarch64, riscv, powerpc, s390), named
/// here rather than taken from a `libc` dependency: opening a FIFO for reading with it returns
/// at once instead of waiting for a writer, so the type check below can refuse it.
const O_NONBLOCK: i32 = 0o4000;
#[cfg(not(all(
    target_os = "linux",
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64",
        target_arch = "powerpc64",
        target_arch = "s390x"
    )
)))]
compile_error!("O_NONBLOCK above is Linux's generic value: check it for this target");

/// Trees whose files are the kernel's views, never credentials.
const PSEUDO_ROOTS: [&str; 2] = ["/proc", "/sys"];

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot open {path}: {error}")]
    Open { path: String, error: std::io::Error },
    #[error("{path} is {kind}, not a regular file: point it at a file holding the credential")]
    NotAFile { path: String, kind: &'static str },
    #[error("{path} is under {root}, whose files are the kernel's, not credentials: point it at a regular file holding the credential")]
    Pseudo { path: String, root: &'static str },
    #[error(
        "{path} holds more than {limit} bytes, the most a credential file may hold: point it at the credential itself"
    )]
    TooLarge { path: String, limit: u64 },
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("reading {path} took more than {seconds} s: check the volume it is on")]
    TimedOut { path: String, seconds: u64 },
}

/// Reads the credential file at `path` (blocking: for start-up, before the runtime serves).
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    let name = || path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .map_err(|error| FileError::Open { path: name(), error })?;
    let metadata = file.metadata().map_err(|error| FileError::Read { path: name(), error })?;
    let kind = metadata.file_type();
    let not_a_file = if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else if !kind.is_file() {
        Some("not a file")
    } else {
        None
    };
    if let Some(kind) = not_a_file {
        return Err(FileError::NotAFile { path: name(), kind });
    }
    // Where the open file really is, symbolic links followed, as the kernel names it.
    let opened = opened_path(&file).or_else(|| std::fs::canonicalize(path).ok()).unwrap_or_else(|| path.to_owned());
    if let Some(root) = PSEUDO_ROOTS.into_iter().find(|root| opened.starts_with(root)) {
        return Err(FileError::Pseudo { path: name(), root });
    }
    if metadata.len() > MAX_CREDENTIAL_FILE {
        return Err(FileError::TooLarge { path: name(), limit: MAX_CREDENTIAL_FILE });
    }
    // The size can grow between the stat and the read: read one byte past the limit to know.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(MAX_CREDENTIAL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| FileError::Read { path: name(), error })?;
    if bytes.len() as u64 > MAX_CREDENTIAL_FILE {
        return Err(FileError::TooLarge { path: name(), limit: MAX_CREDENTIAL_FILE });
    }
    Ok(bytes)
}

/// [`read`] on the blocking pool, within [`READ_TIMEOUT`], for reads made while serving.
pub async fn read_async(path: PathBuf) -> Result<Vec<u8>, FileError> {
    let name = path.display().to_string();
    match tokio::time::timeout(READ_TIMEOUT, tokio::task::spawn_blocking(move || read(&path))).await {
        Ok(Ok(read)) => read,
        Ok(Err(joined)) => {
            Err(FileError::Read { path: name, error: std::io::Error::other(format!("the read failed: {joined}")) })
        }
        Err(_) => Err(FileError::TimedOut { path: name, seconds: READ_TIMEOUT.as_secs() }),
    }
}

/// The path the kernel gives the open file (`/proc/self/fd/N`), when /proc is there to ask.
fn opened_path(file: &File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let small = dir.path().join("token");
        std::fs::write(&small, b"eyJ.x.y").expect("write");
        assert_eq!(read(&small).expect("a small file"), b"eyJ.x.y");
        let limit = dir.path().join("limit");
        std::fs::write(&limit, vec![b'a'; MAX_CREDENTIAL_FILE as usize]).expect("write");
        assert_eq!(read(&limit).expect("at the limit").len(), MAX_CREDENTIAL_FILE as usize);
        let large = dir.path().join("large");
        std::fs::write(&large, vec![b'a'; MAX_CREDENTIAL_FILE as usize + 1]).expect("write");
        let link = dir.path().join("environ");
        std::os::unix::fs::symlink("/proc/self/environ", &link).expect("symlink");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(made.success());
        let refusals: [(&Path, &str); 6] = [
            (&large, "more than 65536 bytes"),
            (Path::new("/dev/zero"), "a character device"),
            (Path::new("/proc/self/environ"), "under /proc"),
            (&link, "under /proc"),
            (&fifo, "a FIFO"),
            (dir.path(), "not a file"),
        ];
        for (path, words) in refusals {
            let error = read(path).expect_err("refused").to_string();
            assert!(error.contains(words) && error.contains(&path.display().to_string()), "{error}");
        }
    }
}
