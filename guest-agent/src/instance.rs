//! Reading the host agent's instance file (`/role/reddog-instance.json`):
//! the instance's id, role name and environment from the goal state.
//!
//! The file's type, bounds and strict decoder are the host <-> guest
//! contract and live in `guest_proto::instance_file` (the host agent encodes
//! with the same type). This module adds what only the guest does: find the
//! file on the role disk, refuse anything but a regular file, read it
//! bounded, and name the path in every error. It is applied to the role with
//! [`crate::manifest::Manifest::apply_instance`].

use std::path::{Path, PathBuf};

use guest_proto::instance_file::{InstanceFile, InstanceFileError, MAX_INSTANCE_FILE_BYTES};

pub use guest_proto::instance_file::INSTANCE_FILE;

/// The role's variable holding the instance id (set when there is an instance file).
pub const ENV_INSTANCE_ID: &str = "REDDOG_INSTANCE_ID";
/// The role's variable holding the role name (set when there is an instance file).
pub const ENV_ROLE: &str = "REDDOG_ROLE";

/// Errors reading or validating the instance file. The host agent writes it
/// from the goal state, so each message says to fix the instance's spec there.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a regular file (a symlink, a directory, a device).
    #[error("{path} is not a regular file; the host agent writes a plain file there (a role package must not hold one of that name)")]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// Too large, not UTF-8, not the JSON the host agent writes, or a field
    /// out of its bounds.
    #[error("{path}: {source}")]
    Refused {
        /// The file.
        path: PathBuf,
        /// What the decoder refused.
        source: InstanceFileError,
    },
}

/// Reads (bounded) and validates the instance file at `path`; `Ok(None)` if
/// there is none (a role disk made without the host agent).
pub fn load_instance(path: &Path) -> Result<Option<InstanceFile>, LoadError> {
    use std::io::Read;
    let read_err = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let refused = |source| LoadError::Refused {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    if !meta.is_file() {
        return Err(LoadError::NotAFile {
            path: path.to_owned(),
        });
    }
    // Refused by its size before reading; the decoder checks the bytes read
    // again (the file may grow in between).
    if meta.len() > MAX_INSTANCE_FILE_BYTES as u64 {
        return Err(refused(InstanceFileError::TooLarge {
            len: usize::try_from(meta.len()).unwrap_or(usize::MAX),
        }));
    }
    let f = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    f.take(MAX_INSTANCE_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    InstanceFile::decode(&bytes).map(Some).map_err(refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_file_loading_is_bounded_and_strict() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join(INSTANCE_FILE);
        assert!(matches!(load_instance(&f), Ok(None)), "absent: no instance");
        std::fs::write(
            &f,
            r#"{"version":1,"instance_id":"a","role":"r","env":{"K":"v"}}"#,
        )
        .expect("write");
        let i = load_instance(&f).expect("valid").expect("present");
        assert_eq!(i.env["K"], "v");
        std::fs::write(&f, vec![b' '; MAX_INSTANCE_FILE_BYTES + 1]).expect("write");
        assert!(matches!(
            load_instance(&f),
            Err(LoadError::Refused {
                source: InstanceFileError::TooLarge { .. },
                ..
            })
        ));
        std::fs::write(&f, b"{\"version\":1,\xff}").expect("write");
        let e = load_instance(&f).expect_err("not utf-8").to_string();
        assert!(e.contains("UTF-8"), "{e}");
        // A field out of bounds: the decoder's message, with the path.
        std::fs::write(&f, r#"{"version":1,"instance_id":"A","role":"r"}"#).expect("write");
        let e = load_instance(&f).expect_err("bad id").to_string();
        assert!(
            e.starts_with(&f.display().to_string()) && e.contains("`instance_id`"),
            "{e}"
        );
        std::fs::remove_file(&f).expect("rm");
        std::os::unix::fs::symlink("/dev/zero", &f).expect("symlink");
        assert!(matches!(load_instance(&f), Err(LoadError::NotAFile { .. })));
        std::fs::remove_file(&f).expect("rm");
        std::fs::create_dir(&f).expect("mkdir");
        assert!(matches!(load_instance(&f), Err(LoadError::NotAFile { .. })));
    }
}
