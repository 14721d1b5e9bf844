//! The guest's disks: the OS base image (an ext4 root built from Debian's
//! `busybox-static` and a static `reddog-guest`), a qcow2 overlay per VM over
//! it, the role disk and the resource disk (all through the `vhd` crate).
//!
//! The base image is cached like the kernel:
//! `${REDDOG_CACHE:-$HOME/.cache/reddog}/os-images/<key>/base.img`, where the
//! key hashes the busybox package's sha256 (from apt), the `reddog-guest`
//! binary and [`LAYOUT_VERSION`]; a new busybox, a rebuilt agent or a new
//! layout gives a new entry. Entries are built in a temporary directory and
//! renamed into place; old ones are deleted by hand.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::artifacts::{self, io_err, run, ArtifactError};

/// Bump when the image's layout (files, users, size) changes.
pub const LAYOUT_VERSION: &str = "reddog-os-base 1";
/// Size of the base image.
pub const BASE_IMAGE_SIZE: u64 = 32 << 20;
/// The role user in the base image.
pub const ROLE_USER: &str = "reddog";
/// Its uid and gid.
pub const ROLE_UID: u32 = 1000;

/// Errors building the disks.
#[derive(Debug, thiserror::Error)]
pub enum OsImageError {
    /// apt, dpkg-deb, the cache or the guest agent binary failed.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The `vhd` crate failed (mkfs.ext4, qcow2).
    #[error("disk image: {0}")]
    Disk(#[from] vhd::DiskError),
    /// The package did not hold what was expected.
    #[error("{0}")]
    Layout(String),
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> OsImageError + '_ {
    move |e| OsImageError::Artifact(io_err(p)(e))
}

/// busybox applets linked in `/bin` of the base image.
const APPLETS: &[&str] = &[
    "sh", "ash", "cat", "cp", "echo", "env", "false", "grep", "head", "httpd", "id", "kill", "ls",
    "mkdir", "mount", "mv", "nc", "ps", "rm", "sleep", "sync", "tail", "true", "umount", "uname",
    "wget",
];

fn busybox_package() -> Result<artifacts::AptPackage, OsImageError> {
    match artifacts::apt_show("busybox-static")? {
        Some(p) => Ok(p),
        None => {
            artifacts::apt_update()?;
            artifacts::apt_show("busybox-static")?.ok_or_else(|| {
                OsImageError::Layout(
                    "apt knows no busybox-static, even after `apt-get update`: check \
                     /etc/apt/sources.list has Debian 12 (bookworm) main"
                        .into(),
                )
            })
        }
    }
}

fn require_guest_agent(guest_agent: &Path) -> Result<(), OsImageError> {
    artifacts::require_static(
        guest_agent,
        "build reddog-guest with RUSTFLAGS=\"-C target-feature=+crt-static\" \
         (cargo build --release -p guest-agent --target x86_64-unknown-linux-gnu)",
    )?;
    Ok(())
}

/// The cached OS base image (raw ext4, label `reddog-os`) with `guest_agent`
/// (a statically linked `reddog-guest`) as `/sbin/reddog-guest`, built if
/// missing. The cache is [`artifacts::cache_root`].
pub fn base_image(guest_agent: &Path) -> Result<PathBuf, OsImageError> {
    base_image_in(&artifacts::cache_root()?, guest_agent)
}

/// [`base_image`] with the cache rooted at `cache` (its `os-images/`
/// subdirectory holds the entries).
pub fn base_image_in(cache: &Path, guest_agent: &Path) -> Result<PathBuf, OsImageError> {
    require_guest_agent(guest_agent)?;
    let pkg = busybox_package()?;
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION.as_bytes());
    h.update(pkg.sha256.as_bytes());
    h.update(artifacts::sha256_file(guest_agent)?.as_bytes());
    let key: String = h
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let images = cache.join("os-images");
    let dir = images.join(&key);
    let image = dir.join("base.img");
    if image.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(&images).map_err(io(&images))?;
    let tmp = images.join(format!(".tmp-{}", artifacts::unique_suffix()));
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    let built = build_base(&pkg, guest_agent, &tmp);
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, &dir) {
        Ok(()) => {}
        Err(_) if image.is_file() => {
            let _ = fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(io(&dir)(e));
        }
    }
    Ok(image)
}

/// Builds the OS base image with `guest_agent` into the file `out` (not
/// cached): the work happens in a temporary directory next to `out`, and the
/// finished image is renamed into place. Returns the busybox-static version used.
pub fn write_base_image(guest_agent: &Path, out: &Path) -> Result<String, OsImageError> {
    require_guest_agent(guest_agent)?;
    let pkg = busybox_package()?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(".reddog-os-base-{}", artifacts::unique_suffix()));
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    let result = build_base(&pkg, guest_agent, &tmp).and_then(|()| {
        let img = tmp.join("base.img");
        fs::rename(&img, out).map_err(io(out))
    });
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| pkg.version)
}

fn build_base(pkg: &artifacts::AptPackage, agent: &Path, tmp: &Path) -> Result<(), OsImageError> {
    let spec = format!("{}={}", pkg.name, pkg.version);
    run(Command::new("apt-get")
        .args(["download", "-q", &spec])
        .current_dir(tmp))?;
    let deb = fs::read_dir(tmp)
        .map_err(io(tmp))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| OsImageError::Layout(format!("no .deb in {}", tmp.display())))?;
    let actual = artifacts::sha256_file(&deb)?;
    if actual != pkg.sha256 {
        return Err(OsImageError::Layout(format!(
            "{} has sha256 {actual}, apt lists {}: the download is corrupt; run again",
            deb.display(),
            pkg.sha256
        )));
    }
    let pkgroot = tmp.join("pkg");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&pkgroot))?;
    let busybox = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| pkgroot.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| OsImageError::Layout("busybox-static holds no bin/busybox".into()))?;

    let root = tmp.join("root");
    for d in [
        "bin",
        "sbin",
        "etc",
        "dev",
        "proc",
        "sys",
        "run",
        "var",
        "mnt/resource",
        "role",
        "home/reddog",
    ] {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(io(&p))?;
    }
    let chmod = |p: &Path, mode: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(io(p))
    };
    for (d, mode) in [("tmp", 0o1777), ("root", 0o700)] {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(io(&p))?;
        chmod(&p, mode)?;
    }
    // Only root can give the home to the role user; elsewhere it stays ours.
    let _ = std::os::unix::fs::chown(root.join("home/reddog"), Some(ROLE_UID), Some(ROLE_UID));
    let bb = root.join("bin/busybox");
    fs::copy(&busybox, &bb).map_err(io(&bb))?;
    chmod(&bb, 0o755)?;
    for a in APPLETS {
        let l = root.join("bin").join(a);
        std::os::unix::fs::symlink("busybox", &l).map_err(io(&l))?;
    }
    let g = root.join("sbin/reddog-guest");
    fs::copy(agent, &g).map_err(io(&g))?;
    chmod(&g, 0o755)?;
    for (f, text) in [
        (
            "etc/passwd",
            format!("root:x:0:0:root:/root:/bin/sh\n{ROLE_USER}:x:{ROLE_UID}:{ROLE_UID}:reddog role:/home/reddog:/bin/sh\n"),
        ),
        ("etc/group", format!("root:x:0:\n{ROLE_USER}:x:{ROLE_UID}:\n")),
        ("etc/hostname", "reddog-guest\n".into()),
        ("etc/reddog-os-release", format!("{LAYOUT_VERSION}\nbusybox-static {}\n", pkg.version)),
    ] {
        let p = root.join(f);
        fs::write(&p, text).map_err(io(&p))?;
    }
    vhd::ext4::create_role_disk(
        &tmp.join("base.img"),
        &root,
        Some(BASE_IMAGE_SIZE),
        "reddog-os",
    )?;
    let _ = fs::remove_dir_all(&root);
    let _ = fs::remove_dir_all(&pkgroot);
    let _ = fs::remove_file(&deb);
    Ok(())
}

/// A qcow2 overlay at `out` over the raw `base` (recorded as `base_name`);
/// the VMM opens it with `backing=<base>,backing_format=raw`.
pub fn os_overlay(base: &Path, base_name: &str, out: &Path) -> Result<(), OsImageError> {
    let image = vhd::open(base, vhd::Format::Raw, vhd::OpenOptions::read_only())?;
    let base_ref = vhd::BaseRef {
        image: Arc::clone(&image),
        name: base_name.to_owned(),
    };
    vhd::create_diff(out, vhd::Format::Qcow2, &base_ref, None, None)?;
    Ok(())
}

/// A role disk at `out` holding a copy of `dir` (ext4, label `reddog-role`).
pub fn role_disk(dir: &Path, out: &Path) -> Result<(), OsImageError> {
    vhd::ext4::create_role_disk(out, dir, None, "reddog-role")?;
    Ok(())
}

/// A formatted resource disk of `size` bytes at `out`.
pub fn resource_disk(out: &Path, size: u64) -> Result<(), OsImageError> {
    vhd::ext4::create_resource_disk(out, size, true, "reddog-res")?;
    Ok(())
}

/// Writes the web role into `dir`: `role.json` running busybox httpd as the
/// role user on `port`, serving `www/` from the role disk, ready when
/// `GET /index.html` answers (and checked the same way every 2 s after that:
/// three failures in a row restart it); and `www/index.html` with `body`. Before httpd
/// starts, the role prints one line with what the host agent gave it
/// (`web role: instance=<REDDOG_INSTANCE_ID> role=<REDDOG_ROLE>
/// greeting=<GREETING>`): the host agent logs it.
pub fn web_role(dir: &Path, port: u16, body: &str) -> Result<(), OsImageError> {
    let www = dir.join("www");
    fs::create_dir_all(&www).map_err(io(&www))?;
    let index = www.join("index.html");
    fs::write(&index, body).map_err(io(&index))?;
    let manifest = format!(
        r#"{{
  "version": 1,
  "program": "/bin/busybox",
  "args": ["sh", "-c", "echo \"web role: instance=$REDDOG_INSTANCE_ID role=$REDDOG_ROLE greeting=$GREETING\"; exec /bin/busybox httpd -f -p 127.0.0.1:{port} -h /role/www"],
  "working_dir": "/role",
  "user": "{ROLE_USER}",
  "readiness": {{"http": {{"port": {port}, "path": "/index.html"}}}},
  "liveness": {{"interval_ms": 2000, "timeout_ms": 1000, "failures": 3}},
  "restart": {{"policy": "always", "initial_backoff_ms": 200, "max_backoff_ms": 10000}}
}}
"#
    );
    let m = dir.join("role.json");
    fs::write(&m, manifest).map_err(io(&m))?;
    Ok(())
}

/// Writes a worker role into `dir`: `role.json` running `/role/<program>`
/// (copied from `program`) with `args` as the role user, no readiness check.
pub fn worker_role(dir: &Path, program: &Path, args: &[&str]) -> Result<(), OsImageError> {
    let name = program
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| OsImageError::Layout(format!("{} has no file name", program.display())))?;
    let dst = dir.join(name);
    fs::copy(program, &dst).map_err(io(&dst))?;
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).map_err(io(&dst))?;
    let args = serde_json::to_string(args).map_err(|e| OsImageError::Layout(e.to_string()))?;
    let manifest = format!(
        r#"{{"version": 1, "program": "/role/{name}", "args": {args}, "user": "{ROLE_USER}", "restart": {{"policy": "on-failure"}}}}
"#
    );
    let m = dir.join("role.json");
    fs::write(&m, manifest).map_err(io(&m))?;
    Ok(())
}
