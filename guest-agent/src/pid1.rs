//! PID 1 duties in the VM: find the disks by serial, mount the OS disk as the
//! new root with the resource and role disks under it, move into it
//! (switch_root semantics), and at the end unmount and power off.

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::probe::{self, say, Disk};
use crate::sys;

/// Serial of the OS disk (ext4, becomes `/`).
pub const OS_SERIAL: &str = "reddog-os";
/// Serial of the resource disk (ext4, read-write at [`RESOURCE_MOUNT`]).
pub const RESOURCE_SERIAL: &str = "reddog-resource";
/// Serial of the role disk (ext4, read-only at [`ROLE_MOUNT`]).
pub const ROLE_SERIAL: &str = "reddog-role";
/// Where the resource disk goes in the OS root.
pub const RESOURCE_MOUNT: &str = "/mnt/resource";
/// Where the role disk goes in the OS root.
pub const ROLE_MOUNT: &str = "/role";
/// Where the OS disk is mounted before the switch.
const NEW_ROOT: &str = "/newroot";

/// Boot failures that leave the guest without its OS root.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// No disk with the OS serial appeared.
    #[error("no disk with serial {OS_SERIAL} appeared within {0:?}")]
    NoOsDisk(Duration),
    /// A mount or the switch failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The failure.
        source: sys::SysError,
    },
    /// A file-system operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: std::io::Error,
    },
}

/// What boot found, for the agent's first `Log` lines.
#[derive(Debug, Default)]
pub struct Booted {
    /// Problems worth telling the host (e.g. an unformatted resource disk).
    pub warnings: Vec<String>,
    /// Whether the role disk is mounted.
    pub role_mounted: bool,
    /// Whether the resource disk is mounted.
    pub resource_mounted: bool,
}

/// Whether `dev` holds an ext2/3/4 superblock (magic 0xEF53 at byte 1080).
pub fn has_ext4_magic(dev: &Path) -> bool {
    let Ok(f) = fs::File::open(dev) else {
        return false;
    };
    let mut m = [0u8; 2];
    f.read_exact_at(&mut m, 1080).is_ok() && m == [0x53, 0xEF]
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(sys::SysError) -> BootError {
    let what = what.into();
    move |source| BootError::Sys { what, source }
}

fn mkdir(p: &str) -> Result<(), BootError> {
    fs::create_dir_all(p).map_err(|source| BootError::Io {
        what: format!("mkdir {p}"),
        source,
    })
}

/// Waits up to `wait` for the three disks (the OS disk is required).
fn wait_for_disks(wait: Duration) -> Vec<Disk> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let disks = probe::list_disks(Path::new("/sys/block"));
        let has = |s: &str| disks.iter().any(|d| d.serial == s);
        if (has(OS_SERIAL) && has(ROLE_SERIAL) && has(RESOURCE_SERIAL))
            || std::time::Instant::now() >= deadline
        {
            return disks;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mounts the disks and switches into the OS root. On error the guest stays
/// in the initramfs (the agent still runs and tells the host).
pub fn mount_and_switch(wait: Duration) -> Result<Booted, BootError> {
    let disks = wait_for_disks(wait);
    let dev = |serial: &str| {
        disks
            .iter()
            .find(|d| d.serial == serial)
            .map(|d| format!("/dev/{}", d.name))
    };
    let os = dev(OS_SERIAL).ok_or(BootError::NoOsDisk(wait))?;
    let mut booted = Booted::default();
    mkdir(NEW_ROOT)?;
    if !has_ext4_magic(Path::new(&os)) {
        return Err(BootError::Io {
            what: format!("OS disk {os} ({OS_SERIAL})"),
            source: std::io::Error::other("no ext4 file system on it"),
        });
    }
    sys::mount(&os, NEW_ROOT, "ext4", 0, "").map_err(sys_err(format!("mount OS disk {os}")))?;
    say(&format!("os disk {os} mounted"));

    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    match dev(ROLE_SERIAL) {
        Some(role) => {
            let target = format!("{NEW_ROOT}{ROLE_MOUNT}");
            mkdir(&target)?;
            match sys::mount(&role, &target, "ext4", libc::MS_RDONLY | nosuid, "") {
                Ok(()) => {
                    booted.role_mounted = true;
                    say(&format!(
                        "role disk {role} mounted read-only at {ROLE_MOUNT}"
                    ));
                }
                Err(e) => booted.warnings.push(format!(
                    "role disk {role} ({ROLE_SERIAL}) did not mount: {e}"
                )),
            }
        }
        None => booted
            .warnings
            .push(format!("no role disk (serial {ROLE_SERIAL})")),
    }
    match dev(RESOURCE_SERIAL) {
        Some(res) if !has_ext4_magic(Path::new(&res)) => booted.warnings.push(format!(
            "resource disk {res} ({RESOURCE_SERIAL}) is not formatted (no ext4 superblock); \
             not mounted. Create it with `reddog-image create -f raw --ext4`"
        )),
        Some(res) => {
            let target = format!("{NEW_ROOT}{RESOURCE_MOUNT}");
            mkdir(&target)?;
            match sys::mount(&res, &target, "ext4", nosuid, "") {
                Ok(()) => {
                    booted.resource_mounted = true;
                    say(&format!("resource disk {res} mounted at {RESOURCE_MOUNT}"));
                }
                Err(e) => booted.warnings.push(format!(
                    "resource disk {res} ({RESOURCE_SERIAL}) did not mount: {e}"
                )),
            }
        }
        None => booted
            .warnings
            .push(format!("no resource disk (serial {RESOURCE_SERIAL})")),
    }
    for w in &booted.warnings {
        say(w);
    }

    // Free the initramfs (it stays in RAM otherwise), as switch_root does.
    for f in ["/init", "/etc/reddog/modules"] {
        let _ = fs::remove_file(f);
    }
    if let Ok(entries) = fs::read_dir("/lib/modules") {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    for d in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{d}");
        mkdir(&target)?;
        sys::mount(d, &target, "", libc::MS_MOVE, "").map_err(sys_err(format!("move {d}")))?;
    }
    std::env::set_current_dir(NEW_ROOT).map_err(|source| BootError::Io {
        what: format!("chdir {NEW_ROOT}"),
        source,
    })?;
    sys::mount(".", "/", "", libc::MS_MOVE, "").map_err(sys_err("move the new root onto /"))?;
    std::os::unix::fs::chroot(".").map_err(|source| BootError::Io {
        what: "chroot".into(),
        source,
    })?;
    std::env::set_current_dir("/").map_err(|source| BootError::Io {
        what: "chdir /".into(),
        source,
    })?;
    say("switched to the OS root");
    Ok(booted)
}

/// Syncs, unmounts the role and resource disks, remounts `/` read-only and
/// powers off. Never returns (PID 1 must not exit).
pub fn power_off(booted: Option<&Booted>) -> ! {
    sys::sync();
    if let Some(b) = booted {
        for (mounted, m) in [
            (b.resource_mounted, RESOURCE_MOUNT),
            (b.role_mounted, ROLE_MOUNT),
        ] {
            if mounted {
                match sys::umount(m, 0) {
                    Ok(()) => say(&format!("unmounted {m}")),
                    Err(e) => say(&format!("unmount {m} failed: {e}")),
                }
            }
        }
        match sys::mount("/", "/", "", libc::MS_REMOUNT | libc::MS_RDONLY, "") {
            Ok(()) => say("root remounted read-only"),
            Err(e) => say(&format!("remount / read-only failed: {e}")),
        }
    }
    say("poweroff");
    let e = sys::power_off();
    say(&format!("poweroff failed: {e}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Reads the first line of a small file, bounded.
pub fn read_small(path: &str) -> String {
    let mut s = String::new();
    if let Ok(f) = fs::File::open(path) {
        let _ = f.take(64 * 1024).read_to_string(&mut s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_magic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("img");
        let mut b = vec![0u8; 4096];
        fs::write(&p, &b).expect("write");
        assert!(!has_ext4_magic(&p));
        b[1080] = 0x53;
        b[1081] = 0xEF;
        fs::write(&p, &b).expect("write");
        assert!(has_ext4_magic(&p));
        assert!(!has_ext4_magic(&dir.path().join("none")));
    }
}
