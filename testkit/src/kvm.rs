//! The one KVM check of the KVM tests and benchmarks. KVM tests never skip: on a
//! host without a usable `/dev/kvm` they fail and say what is missing.

use std::path::Path;

/// Where KVM is.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Why this host's KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` is not there.
    #[error("{KVM_DEVICE} does not exist: load a KVM module (kvm_intel, kvm_amd or kvm-pvm) or run on a host with KVM; KVM tests do not skip")]
    Missing,
    /// `/dev/kvm` is there but cannot be opened read/write.
    #[error("{KVM_DEVICE} cannot be opened read/write ({source}): add this user to the kvm group or fix the device's permissions; KVM tests do not skip")]
    Open {
        /// The open error.
        source: std::io::Error,
    },
}

/// Checks that `/dev/kvm` opens read/write (the benchmarks' flavour: they
/// report the error and exit).
pub fn check_kvm() -> Result<(), KvmError> {
    check_device(Path::new(KVM_DEVICE))
}

/// Fails the calling test, with what is missing, when this host has no usable
/// KVM. Call it first in every test that boots a VM.
#[track_caller]
pub fn require_kvm() {
    if let Err(e) = check_kvm() {
        panic!("this test needs KVM: {e}");
    }
}

fn check_device(path: &Path) -> Result<(), KvmError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(KvmError::Missing),
        Err(source) => Err(KvmError::Open { source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_says_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = check_device(&dir.path().join("kvm")).expect_err("no device there");
        assert!(matches!(err, KvmError::Missing), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn a_device_that_cannot_be_opened_read_write_says_why() {
        // A directory never opens for writing, whoever runs the test.
        let dir = tempfile::tempdir().expect("temp dir");
        let err = check_device(dir.path()).expect_err("a directory is not a device");
        assert!(matches!(err, KvmError::Open { .. }), "{err}");
        assert!(err.to_string().contains("read/write"), "{err}");
    }
}
