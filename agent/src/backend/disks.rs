//! The agent <-> disks seam: an instance's OS disk (differencing over a cached
//! base), resource disk and role disk, as the [`DiskPreparer`] trait and the
//! types it speaks. [`super::vhd_disks::VhdDiskPreparer`] makes them with the
//! `vhd` crate; `super::fake::FakeDisks` (feature `fake`) is for tests.
//!
//! The role disk holds the role package plus one file of the agent's,
//! [`INSTANCE_FILE`] at its root: the instance's id, role name and environment
//! for `reddog-guest` (`docs/guest-agent.md`). An update remakes only the disks
//! the change needs ([`disks_to_rebuild`], [`DiskPreparer::remake`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use vmm_api::{DiskConfig, DiskFormat};

use crate::spec::InstanceSpec;

/// The instance file (its name, its size limit and its type) is the host <->
/// guest contract in `guest-proto`, shared with `reddog-guest`.
pub use guest_proto::instance_file::{InstanceFile, INSTANCE_FILE, MAX_INSTANCE_FILE_BYTES};

/// What to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRequest {
    /// The instance.
    pub instance_id: String,
    /// The role's name (written to [`INSTANCE_FILE`]).
    pub role: String,
    /// The role's environment (written to [`INSTANCE_FILE`]).
    pub env: BTreeMap<String, String>,
    /// Where the disks go (created empty by the agent; removed by it on failure).
    pub dir: PathBuf,
    /// The cached base image (read-only).
    pub base: PathBuf,
    /// Its format.
    pub base_format: DiskFormat,
    /// The role package directory.
    pub role_package: PathBuf,
    /// Resource disk size, bytes.
    pub resource_disk_bytes: u64,
    /// The guest's network (written to [`INSTANCE_FILE`]), when it has one.
    pub net: Option<guest_proto::instance_file::InstanceNet>,
}

/// The instance file's bytes for `req` (bounded by the contract's limit).
pub fn instance_file_bytes(req: &DiskRequest) -> Result<Vec<u8>, DiskPrepError> {
    InstanceFile::new(req.instance_id.clone(), req.role.clone(), req.env.clone())
        .with_net(req.net)
        .encode()
        .map_err(|e| match e {
            guest_proto::instance_file::InstanceFileError::TooLarge { len } => {
                DiskPrepError::InstanceFileTooLarge { len }
            }
            e => DiskPrepError::Other(format!("cannot encode {INSTANCE_FILE}: {e}")),
        })
}

/// The three disks, in guest order, as the VMM takes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedDisks {
    /// OS disk: a qcow2 overlay over the base.
    pub os: DiskConfig,
    /// Resource disk: raw, ext4.
    pub resource: DiskConfig,
    /// Role disk: raw, ext4, read-only to the guest.
    pub role: DiskConfig,
}

impl PreparedDisks {
    /// The disks in guest order (vda, vdb, vdc).
    pub fn in_order(&self) -> Vec<DiskConfig> {
        vec![self.os.clone(), self.resource.clone(), self.role.clone()]
    }

    /// The disks in `set`.
    pub fn select(&self, set: DiskSet) -> Vec<&DiskConfig> {
        [
            (set.os, &self.os),
            (set.resource, &self.resource),
            (set.role, &self.role),
        ]
        .into_iter()
        .filter_map(|(on, d)| on.then_some(d))
        .collect()
    }
}

/// A subset of an instance's three disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSet {
    /// The OS disk.
    pub os: bool,
    /// The resource disk.
    pub resource: bool,
    /// The role disk.
    pub role: bool,
}

impl DiskSet {
    /// No disk.
    pub const NONE: DiskSet = DiskSet {
        os: false,
        resource: false,
        role: false,
    };
    /// All three.
    pub const ALL: DiskSet = DiskSet {
        os: true,
        resource: true,
        role: true,
    };

    /// Whether no disk is in the set.
    pub fn is_empty(self) -> bool {
        self == Self::NONE
    }

    /// Whether all three are.
    pub fn is_all(self) -> bool {
        self == Self::ALL
    }

    /// The disks in either set.
    #[must_use]
    pub fn union(self, other: DiskSet) -> DiskSet {
        DiskSet {
            os: self.os || other.os,
            resource: self.resource || other.resource,
            role: self.role || other.role,
        }
    }

    /// The disks not in the set.
    #[must_use]
    pub fn complement(self) -> DiskSet {
        DiskSet {
            os: !self.os,
            resource: !self.resource,
            role: !self.role,
        }
    }

    /// How many disks are in the set.
    pub fn count(self) -> usize {
        [self.os, self.resource, self.role]
            .into_iter()
            .filter(|b| *b)
            .count()
    }

    /// For messages: `the OS disk`, `the resource and role disks`, `no disk`.
    pub fn phrase(self) -> String {
        match self.count() {
            0 => "no disk".into(),
            1 => format!("the {self} disk"),
            _ => format!("the {self} disks"),
        }
    }
}

impl fmt::Display for DiskSet {
    /// `OS, resource and role`, `role`, `no`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.os, "OS"),
            (self.resource, "resource"),
            (self.role, "role"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
        match names.as_slice() {
            [] => f.write_str("no"),
            [one] => f.write_str(one),
            [a, b] => write!(f, "{a} and {b}"),
            [a, b, c] => write!(f, "{a}, {b} and {c}"),
            _ => Ok(()),
        }
    }
}

/// Which disks an instance needs remade when its spec changes from `old` to
/// `new`: a new base image remakes the OS disk (the resource disk, scratch
/// data, survives an OS swap), a new role package, role name or environment
/// the role disk, a new resource disk size the resource disk; vCPUs, memory
/// and the heartbeat interval need none (the VMM restarts over the same disks).
pub fn disks_to_rebuild(old: &InstanceSpec, new: &InstanceSpec) -> DiskSet {
    if old.id != new.id {
        return DiskSet::ALL;
    }
    DiskSet {
        os: old.image_sha256() != new.image_sha256(),
        resource: old.resource_disk_mib != new.resource_disk_mib,
        role: old.role_package != new.role_package || old.role != new.role || old.env != new.env,
    }
}

/// Why the disks could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskPrepError {
    /// The role package is missing or not a directory.
    #[error("role package {0} is not a directory; give the path of an unpacked role package")]
    RolePackage(PathBuf),
    /// The role package holds the agent's reserved file name.
    #[error("role package {} holds {INSTANCE_FILE}, a name reserved for the agent's instance file (id, role and environment for the guest); remove or rename it in the package", .0.display())]
    ReservedName(PathBuf),
    /// The instance's environment does not fit the instance file.
    #[error("the instance's role, id and environment make {INSTANCE_FILE} {len} bytes, more than the guest accepts ({MAX_INSTANCE_FILE_BYTES}); shorten the environment (each control character takes 6 bytes in JSON)")]
    InstanceFileTooLarge {
        /// The encoded size.
        len: usize,
    },
    /// A disk to keep is gone.
    #[error("the {what} disk {} to keep is missing; the instance needs all disks made again (re-create it)", path.display())]
    KeptDiskMissing {
        /// Which disk.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// The `vhd` crate failed.
    #[error("{what}: {source}")]
    Disk {
        /// Which disk.
        what: &'static str,
        /// The disk error (it says what to do).
        source: vhd::DiskError,
    },
    /// A fake (or a cancelled) preparation.
    #[error("{0}")]
    Other(String),
}

/// Makes and removes an instance's disks.
#[async_trait]
pub trait DiskPreparer: Send + Sync {
    /// Makes the three disks in `req.dir`. On error, partial files may remain;
    /// the agent removes the directory.
    async fn prepare(&self, req: &DiskRequest) -> Result<PreparedDisks, DiskPrepError>;

    /// Remakes the disks in `which` for `req` (an update) and keeps the others
    /// of `current` as they are (same files, same contents). The old files of
    /// the remade disks are removed first. On error, partial files may remain
    /// in `req.dir`; the agent removes every file there but the kept disks.
    async fn remake(
        &self,
        req: &DiskRequest,
        current: &PreparedDisks,
        which: DiskSet,
    ) -> Result<PreparedDisks, DiskPrepError>;
}

/// Fails unless every disk of `current` outside `which` is still there.
pub fn check_kept(current: &PreparedDisks, which: DiskSet) -> Result<(), DiskPrepError> {
    for (what, on, d) in [
        ("OS", which.os, &current.os),
        ("resource", which.resource, &current.resource),
        ("role", which.role, &current.role),
    ] {
        if !on && !d.path.is_file() {
            return Err(DiskPrepError::KeptDiskMissing {
                what,
                path: d.path.clone(),
            });
        }
    }
    Ok(())
}

/// Removes every entry of `dir` except the files of `keep` (what a failed
/// [`DiskPreparer::remake`] leaves behind).
pub fn remove_all_but(dir: &Path, keep: &[&Path]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if keep.iter().any(|k| *k == p) {
            continue;
        }
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if let Err(err) = r {
            tracing::warn!("cannot remove {}: {err}", p.display());
        }
    }
}
