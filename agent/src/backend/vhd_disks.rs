//! [`VhdDiskPreparer`]: an instance's disks made with the `vhd` crate (a qcow2
//! overlay over the cached base, ext4 resource and role disks).

use async_trait::async_trait;
use vmm_api::{BackingConfig, DiskConfig, DiskFormat};

use super::disks::*;

/// Real disks through the `vhd` crate (blocking work on tokio's blocking pool).
#[derive(Debug, Clone, Default)]
pub struct VhdDiskPreparer;

pub(crate) fn to_vhd(f: DiskFormat) -> vhd::Format {
    match f {
        DiskFormat::Raw => vhd::Format::Raw,
        DiskFormat::Qcow2 => vhd::Format::Qcow2,
        DiskFormat::Vhd => vhd::Format::Vhd,
    }
}

/// Checks the role package and encodes the instance file, before anything is
/// made or removed.
fn check_role_inputs(req: &DiskRequest) -> Result<Vec<u8>, DiskPrepError> {
    if !req.role_package.is_dir() {
        return Err(DiskPrepError::RolePackage(req.role_package.clone()));
    }
    let reserved = req.role_package.join(INSTANCE_FILE);
    if reserved.symlink_metadata().is_ok() {
        return Err(DiskPrepError::ReservedName(req.role_package.clone()));
    }
    instance_file_bytes(req)
}

/// Makes a disk the `vhd` crate created owner-only (0600; its directory,
/// the instance's, is 0700 from the start, so nobody else could reach it
/// meanwhile).
fn owner_only(path: &std::path::Path) -> Result<(), DiskPrepError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        DiskPrepError::Other(format!(
            "cannot make {} owner-only: {e}; check the state directory's permissions",
            path.display()
        ))
    })
}

fn make_os(req: &DiskRequest) -> Result<DiskConfig, DiskPrepError> {
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
    owner_only(&os_path)?;
    Ok(DiskConfig {
        path: os_path,
        format: DiskFormat::Qcow2,
        backing: Some(BackingConfig {
            path: req.base.clone(),
            format: req.base_format,
        }),
        read_only: false,
        serial: "reddog-os".into(),
        rate_limit: None,
    })
}

fn make_resource(req: &DiskRequest) -> Result<DiskConfig, DiskPrepError> {
    let res_path = req.dir.join("resource.raw");
    vhd::ext4::create_resource_disk(&res_path, req.resource_disk_bytes, true, "resource").map_err(
        |source| DiskPrepError::Disk {
            what: "create resource disk",
            source,
        },
    )?;
    owner_only(&res_path)?;
    Ok(DiskConfig {
        path: res_path,
        format: DiskFormat::Raw,
        backing: None,
        read_only: false,
        serial: "reddog-resource".into(),
        rate_limit: None,
    })
}

/// The role disk: the package (`mkfs.ext4 -d`) plus [`INSTANCE_FILE`].
fn make_role(req: &DiskRequest, instance_file: &[u8]) -> Result<DiskConfig, DiskPrepError> {
    let role_path = req.dir.join("role.raw");
    vhd::ext4::create_role_disk(&role_path, &req.role_package, None, "role").map_err(|source| {
        DiskPrepError::Disk {
            what: "create role disk",
            source,
        }
    })?;
    vhd::ext4::add_file(&role_path, INSTANCE_FILE, instance_file).map_err(|source| {
        DiskPrepError::Disk {
            what: "write the instance file to the role disk",
            source,
        }
    })?;
    owner_only(&role_path)?;
    Ok(DiskConfig {
        path: role_path,
        format: DiskFormat::Raw,
        backing: None,
        read_only: true,
        serial: "reddog-role".into(),
        rate_limit: None,
    })
}

fn prepare_blocking(req: &DiskRequest) -> Result<PreparedDisks, DiskPrepError> {
    let instance_file = check_role_inputs(req)?;
    // The role disk (mkfs.ext4 -d, then debugfs) on a second thread while the
    // OS overlay and the resource disk (mkfs.ext4) are made: they are
    // independent files, and most of the time is in those child processes.
    std::thread::scope(|s| {
        let role = s.spawn(|| make_role(req, &instance_file));
        let os_and_resource = make_os(req).and_then(|os| Ok((os, make_resource(req)?)));
        let role = role
            .join()
            .map_err(|_| DiskPrepError::Other("the role disk thread panicked".into()))?;
        let (os, resource) = os_and_resource?;
        Ok(PreparedDisks {
            os,
            resource,
            role: role?,
        })
    })
}

fn remove_old(d: &DiskConfig) -> Result<(), DiskPrepError> {
    match std::fs::remove_file(&d.path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DiskPrepError::Other(format!(
            "cannot remove the old disk {}: {e}; check the state directory's permissions",
            d.path.display()
        ))),
    }
}

fn remake_blocking(
    req: &DiskRequest,
    current: &PreparedDisks,
    which: DiskSet,
) -> Result<PreparedDisks, DiskPrepError> {
    check_kept(current, which)?;
    let instance_file = if which.role {
        Some(check_role_inputs(req)?)
    } else {
        None
    };
    for d in current.select(which) {
        remove_old(d)?;
    }
    let mut out = current.clone();
    if which.os {
        out.os = make_os(req)?;
    }
    if which.resource {
        out.resource = make_resource(req)?;
    }
    if let Some(f) = instance_file {
        out.role = make_role(req, &f)?;
    }
    Ok(out)
}

#[async_trait]
impl DiskPreparer for VhdDiskPreparer {
    async fn prepare(&self, req: &DiskRequest) -> Result<PreparedDisks, DiskPrepError> {
        let req = req.clone();
        tokio::task::spawn_blocking(move || prepare_blocking(&req))
            .await
            .map_err(|e| DiskPrepError::Other(format!("disk preparation task failed: {e}")))?
    }

    async fn remake(
        &self,
        req: &DiskRequest,
        current: &PreparedDisks,
        which: DiskSet,
    ) -> Result<PreparedDisks, DiskPrepError> {
        let (req, current) = (req.clone(), current.clone());
        tokio::task::spawn_blocking(move || remake_blocking(&req, &current, which))
            .await
            .map_err(|e| DiskPrepError::Other(format!("disk preparation task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::InstanceSpec;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// `debugfs -R "cat /name"` of an ext4 image.
    fn cat(image: &Path, name: &str) -> Vec<u8> {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{name}"))
            .arg(image)
            .output()
            .expect("debugfs");
        out.stdout
    }

    struct Setup {
        dir: tempfile::TempDir,
        base: PathBuf,
        req: DiskRequest,
    }

    fn setup() -> Setup {
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
            role: "web".into(),
            env: [("MODE".to_string(), "prod \"quoted\"\n".to_string())].into(),
            dir: inst,
            base: base.clone(),
            base_format: DiskFormat::Raw,
            role_package: role,
            resource_disk_bytes: 16 << 20,
            net: None,
        };
        Setup { dir, base, req }
    }

    #[tokio::test]
    async fn makes_three_disks_over_a_base_with_the_instance_file() {
        let Setup { dir, base, req } = setup();
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
        // The role disk holds the package and the agent's instance file.
        assert_eq!(cat(&d.role.path, "run.sh"), b"#!/bin/sh\necho hi\n");
        let f: InstanceFile =
            serde_json::from_slice(&cat(&d.role.path, INSTANCE_FILE)).expect("instance file");
        assert_eq!(
            f,
            InstanceFile::new(req.instance_id.clone(), req.role.clone(), req.env.clone())
        );
        assert_eq!(f.env["MODE"], "prod \"quoted\"\n");
        let text = String::from_utf8(cat(&d.role.path, INSTANCE_FILE)).expect("utf8");
        assert!(
            text.starts_with(r#"{"version":1,"instance_id":"a","role":"web","env":{"#),
            "{text}"
        );

        let bad = DiskRequest {
            role_package: dir.path().join("missing"),
            dir: dir.path().join("inst2"),
            ..req.clone()
        };
        let e = VhdDiskPreparer
            .prepare(&bad)
            .await
            .expect_err("no role dir");
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[tokio::test]
    async fn a_package_with_the_reserved_name_or_a_huge_environment_is_refused() {
        let Setup { dir, req, .. } = setup();
        std::fs::write(req.role_package.join(INSTANCE_FILE), "{}").expect("write");
        let e = VhdDiskPreparer.prepare(&req).await.expect_err("reserved");
        assert!(matches!(e, DiskPrepError::ReservedName(_)), "{e}");
        assert!(e.to_string().contains("reserved"), "{e}");
        assert_eq!(
            std::fs::read_dir(&req.dir).expect("ls").count(),
            0,
            "checked before anything is made"
        );
        std::fs::remove_file(req.role_package.join(INSTANCE_FILE)).expect("rm");
        // Control characters take 6 bytes each in JSON.
        let mut huge = req.clone();
        huge.dir = dir.path().join("inst2");
        huge.env = (0..20)
            .map(|i| (format!("V{i}"), "\u{1}".repeat(4096)))
            .collect();
        let e = VhdDiskPreparer.prepare(&huge).await.expect_err("huge");
        assert!(
            matches!(e, DiskPrepError::InstanceFileTooLarge { .. }),
            "{e}"
        );
    }

    #[test]
    fn which_disks_an_update_remakes() {
        let old = crate::spec::tests::spec("a");
        type Change = fn(&mut InstanceSpec);
        let none = DiskSet::NONE;
        let os = DiskSet { os: true, ..none };
        let res = DiskSet {
            resource: true,
            ..none
        };
        let role = DiskSet { role: true, ..none };
        let cases: Vec<(Change, DiskSet)> = vec![
            (|_| {}, none),
            (|s| s.vcpus = 2, none),
            (|s| s.memory_mib = 512, none),
            (|s| s.heartbeat_interval_ms = 5000, none),
            (|s| s.base_image = format!("sha256:{}", "cd".repeat(32)), os),
            // The same image, spelled differently.
            (|s| s.base_image = "AB".repeat(32), none),
            (|s| s.resource_disk_mib = 128, res),
            (|s| s.role_package = "/srv/roles/web2".into(), role),
            (|s| s.role = "worker".into(), role),
            (
                |s| {
                    s.env.insert("K".into(), "v".into());
                },
                role,
            ),
            (
                |s| {
                    s.base_image = format!("sha256:{}", "cd".repeat(32));
                    s.vcpus = 4;
                    s.env.insert("K".into(), "v".into());
                },
                os.union(role),
            ),
            (|s| s.id = "b".into(), DiskSet::ALL),
        ];
        for (i, (change, want)) in cases.into_iter().enumerate() {
            let mut new = old.clone();
            change(&mut new);
            assert_eq!(disks_to_rebuild(&old, &new), want, "case {i}");
        }
        assert_eq!(os.union(role).to_string(), "OS and role");
        assert_eq!(DiskSet::ALL.to_string(), "OS, resource and role");
        assert_eq!(none.to_string(), "no");
        assert_eq!(role.complement(), os.union(res));
    }

    #[tokio::test]
    async fn a_new_base_keeps_the_resource_disk_and_its_data() {
        let Setup { dir, req, .. } = setup();
        let d = VhdDiskPreparer.prepare(&req).await.expect("prepare");
        // Scratch data on the resource disk, as a guest would leave it.
        vhd::ext4::add_file(&d.resource.path, "scratch.txt", b"keep me").expect("scratch");
        let res_ino = std::fs::metadata(&d.resource.path).expect("stat").ino();
        let role_ino = std::fs::metadata(&d.role.path).expect("stat").ino();
        let base2 = dir.path().join("base2.raw");
        vhd::create(&base2, vhd::Format::Raw, &vhd::CreateOptions::new(16 << 20)).expect("base2");
        let req2 = DiskRequest {
            base: base2.clone(),
            ..req.clone()
        };
        let which = DiskSet {
            os: true,
            ..DiskSet::NONE
        };
        let d2 = VhdDiskPreparer
            .remake(&req2, &d, which)
            .await
            .expect("remake");
        assert_eq!(
            d2.os.backing.as_ref().map(|b| b.path.clone()),
            Some(base2.clone())
        );
        let os = vhd::open(
            &d2.os.path,
            vhd::Format::Qcow2,
            vhd::OpenOptions::read_only().with_backing(
                vhd::open(&base2, vhd::Format::Raw, vhd::OpenOptions::read_only()).expect("base2"),
            ),
        )
        .expect("open the new overlay");
        assert_eq!(os.size(), 16 << 20, "an overlay over the new base");
        assert_eq!(d2.resource, d.resource);
        assert_eq!(d2.role, d.role);
        assert_eq!(
            std::fs::metadata(&d.resource.path).expect("stat").ino(),
            res_ino,
            "the same resource disk file"
        );
        assert_eq!(
            std::fs::metadata(&d.role.path).expect("stat").ino(),
            role_ino
        );
        assert_eq!(cat(&d2.resource.path, "scratch.txt"), b"keep me");

        // A new environment remakes only the role disk, with the new file.
        let mut req3 = req2.clone();
        req3.env.insert("EXTRA".into(), "1".into());
        let role_only = DiskSet {
            role: true,
            ..DiskSet::NONE
        };
        let d3 = VhdDiskPreparer
            .remake(&req3, &d2, role_only)
            .await
            .expect("remake role");
        assert_eq!((&d3.os, &d3.resource), (&d2.os, &d2.resource));
        let f: InstanceFile =
            serde_json::from_slice(&cat(&d3.role.path, INSTANCE_FILE)).expect("instance file");
        assert_eq!(f.env.get("EXTRA").map(String::as_str), Some("1"));
        assert_eq!(cat(&d3.resource.path, "scratch.txt"), b"keep me");

        // A kept disk that vanished: refused, nothing removed.
        std::fs::remove_file(&d3.resource.path).expect("rm");
        let e = VhdDiskPreparer
            .remake(&req3, &d3, role_only)
            .await
            .expect_err("kept disk missing");
        assert!(
            matches!(
                e,
                DiskPrepError::KeptDiskMissing {
                    what: "resource",
                    ..
                }
            ),
            "{e}"
        );
        assert!(d3.role.path.exists() && d3.os.path.exists());
    }

    #[tokio::test]
    async fn disks_are_owner_only_and_a_symlink_out_of_the_package_is_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let Setup { dir, req, .. } = setup();
        // A file outside the package, and a symlink to it inside.
        let marker = format!("reddog-outside-secret-{}", std::process::id());
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, &marker).expect("write");
        std::os::unix::fs::symlink(&outside, req.role_package.join("leak")).expect("ln");
        let d = VhdDiskPreparer.prepare(&req).await.expect("prepare");
        for c in d.in_order() {
            let mode = std::fs::metadata(&c.path)
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", c.path.display());
        }
        // The role disk holds the link itself, not the file it points to.
        let out = Command::new("debugfs")
            .arg("-R")
            .arg("stat /leak")
            .arg(&d.role.path)
            .output()
            .expect("debugfs");
        let stat = String::from_utf8_lossy(&out.stdout);
        assert!(stat.contains("Type: symlink"), "{stat}");
        let image = std::fs::read(&d.role.path).expect("read role disk");
        assert!(
            !image.windows(marker.len()).any(|w| w == marker.as_bytes()),
            "the outside file's content is on the role disk"
        );
    }

    #[test]
    fn remove_all_but_keeps_only_the_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        for n in ["os.qcow2", "resource.raw", "role.raw"] {
            std::fs::write(dir.path().join(n), n).expect("write");
        }
        std::fs::create_dir(dir.path().join("junk")).expect("mkdir");
        let keep = dir.path().join("resource.raw");
        remove_all_but(dir.path(), &[keep.as_path()]);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("resource.raw")]);
    }
}
