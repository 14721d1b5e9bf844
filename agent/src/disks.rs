//! The agent <-> disks seam: an instance's OS disk (differencing over a cached
//! base), resource disk and role disk. [`VhdDiskPreparer`] makes them with the
//! `vhd` crate; [`crate::fake::FakeDisks`] is for tests.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use vmm_api::{BackingConfig, DiskConfig, DiskFormat};

/// What to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRequest {
    /// The instance.
    pub instance_id: String,
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
}

/// Why the disks could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskPrepError {
    /// The role package is missing or not a directory.
    #[error("role package {0} is not a directory; give the path of an unpacked role package")]
    RolePackage(PathBuf),
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
}

/// Real disks through the `vhd` crate (blocking work on tokio's blocking pool).
#[derive(Debug, Clone, Default)]
pub struct VhdDiskPreparer;

fn to_vhd(f: DiskFormat) -> vhd::Format {
    match f {
        DiskFormat::Raw => vhd::Format::Raw,
        DiskFormat::Qcow2 => vhd::Format::Qcow2,
        DiskFormat::Vhd => vhd::Format::Vhd,
    }
}

fn prepare_blocking(req: &DiskRequest) -> Result<PreparedDisks, DiskPrepError> {
    if !req.role_package.is_dir() {
        return Err(DiskPrepError::RolePackage(req.role_package.clone()));
    }
    let os_path = req.dir.join("os.qcow2");
    let base = vhd::open(
        &req.base,
        to_vhd(req.base_format),
        vhd::OpenOptions::read_only(),
    )
    .map_err(|source| DiskPrepError::Disk {
        what: "open base image",
        source,
    })?;
    let base_ref = vhd::BaseRef {
        image: base,
        name: req.base.display().to_string(),
    };
    vhd::create_diff(&os_path, vhd::Format::Qcow2, &base_ref, None, None).map_err(|source| {
        DiskPrepError::Disk {
            what: "create OS disk",
            source,
        }
    })?;
    let res_path = req.dir.join("resource.raw");
    vhd::ext4::create_resource_disk(&res_path, req.resource_disk_bytes, true, "resource").map_err(
        |source| DiskPrepError::Disk {
            what: "create resource disk",
            source,
        },
    )?;
    let role_path = req.dir.join("role.raw");
    vhd::ext4::create_role_disk(&role_path, &req.role_package, None, "role").map_err(|source| {
        DiskPrepError::Disk {
            what: "create role disk",
            source,
        }
    })?;
    Ok(PreparedDisks {
        os: DiskConfig {
            path: os_path,
            format: DiskFormat::Qcow2,
            backing: Some(BackingConfig {
                path: req.base.clone(),
                format: req.base_format,
            }),
            read_only: false,
            serial: "reddog-os".into(),
        },
        resource: DiskConfig {
            path: res_path,
            format: DiskFormat::Raw,
            backing: None,
            read_only: false,
            serial: "reddog-resource".into(),
        },
        role: DiskConfig {
            path: role_path,
            format: DiskFormat::Raw,
            backing: None,
            read_only: true,
            serial: "reddog-role".into(),
        },
    })
}

#[async_trait]
impl DiskPreparer for VhdDiskPreparer {
    async fn prepare(&self, req: &DiskRequest) -> Result<PreparedDisks, DiskPrepError> {
        let req = req.clone();
        tokio::task::spawn_blocking(move || prepare_blocking(&req))
            .await
            .map_err(|e| DiskPrepError::Other(format!("disk preparation task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn makes_three_disks_over_a_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        vhd::create(&base, vhd::Format::Raw, &vhd::CreateOptions::new(8 << 20)).expect("base");
        let role = dir.path().join("role");
        std::fs::create_dir(&role).expect("mkdir");
        std::fs::write(role.join("run.sh"), "#!/bin/sh\necho hi\n").expect("write");
        let inst = dir.path().join("inst");
        std::fs::create_dir(&inst).expect("mkdir");
        let req = DiskRequest {
            instance_id: "a".into(),
            dir: inst.clone(),
            base: base.clone(),
            base_format: DiskFormat::Raw,
            role_package: role.clone(),
            resource_disk_bytes: 16 << 20,
        };
        let d = VhdDiskPreparer.prepare(&req).await.expect("prepare");
        assert_eq!(d.in_order().len(), 3);
        let os = vhd::open(
            &d.os.path,
            vhd::Format::Qcow2,
            vhd::OpenOptions::read_only().with_backing(
                vhd::open(&base, vhd::Format::Raw, vhd::OpenOptions::read_only()).expect("base"),
            ),
        )
        .expect("open overlay");
        assert_eq!(os.size(), 8 << 20);
        assert!(d.role.read_only);

        let bad = DiskRequest {
            role_package: dir.path().join("missing"),
            dir: dir.path().join("inst2"),
            ..req
        };
        let e = VhdDiskPreparer
            .prepare(&bad)
            .await
            .expect_err("no role dir");
        assert!(e.to_string().contains("not a directory"), "{e}");
    }
}
