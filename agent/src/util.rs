//! Small helpers: wall-clock milliseconds, atomic file writes, escaping
//! guest-provided text.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, from the wall clock (never from tokio's
/// test clock: these are for humans and upstream, not for timeouts).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Writes `data` to `path` atomically (owner-only, mode 0600): a temporary file in the same directory,
/// `fsync`, rename over `path`, `fsync` of the directory. A crash leaves either
/// the old or the new content, never a torn file.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Creates `dir` (and missing parents) and gives it `mode` (also when it
/// existed with a wider one): created with the mode, never wider meanwhile.
pub fn create_private_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Serializes `value` as pretty JSON and writes it atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let data = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(path, &data)
}

/// Escapes control characters and non-UTF-8 bytes of guest-provided text so
/// it can be logged or displayed safely, and cuts it at `max` bytes.
pub fn escape_guest_text(bytes: &[u8], max: usize) -> String {
    let bytes = &bytes[..bytes.len().min(max)];
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sleeps until `deadline` (tokio's clock), or forever without one: a
/// `select!` branch that only sometimes has a deadline.
pub async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Why a JSON file the agent stores could not be read (see [`read_json`]);
/// callers turn it into their own error with the path.
#[derive(Debug)]
pub(crate) enum ReadJsonError {
    /// Reading failed (anything but "not found").
    Io(std::io::Error),
    /// The bytes are not the JSON expected.
    Corrupt(serde_json::Error),
}

/// Reads a JSON file the agent stores; `None` when there is none.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, ReadJsonError> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ReadJsonError::Io(e)),
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(ReadJsonError::Corrupt),
    }
}

/// Locks a std mutex, ignoring poisoning (the data behind the agent's
/// mutexes are plain values, consistent after every statement).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_guest_text() {
        assert_eq!(escape_guest_text(b"ok line", 64), "ok line");
        assert_eq!(escape_guest_text(b"a\x1b[2Jb\n", 64), "a\\u{1b}[2Jb\\n");
        assert_eq!(escape_guest_text(b"\xff\xfex", 64), "\\xff\\xfex");
        assert_eq!(escape_guest_text(b"abcdef", 3), "abc");
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r.json");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let leftovers = std::fs::read_dir(dir.path()).expect("ls").count();
        assert_eq!(leftovers, 1);
    }
}
