//! `reddog-jailer`: runs one `reddog-vmm` in a jail (see `docs/isolation.md`,
//! "The jail").
//!
//! The jailer is the only privileged step: it checks and prepares the VM's
//! files on the host, creates the VM's cgroup, enters new mount, pid, ipc
//! and uts namespaces (and a network namespace when asked), builds the jail
//! root (a private tmpfs holding bind mounts of exactly the VM's files and
//! its own `/dev/kvm`), forks the VMM as pid 1 of its pid namespace,
//! `pivot_root`s into the jail, drops to the VM's uid and gid with no
//! capabilities and `no_new_privs`, sets rlimits, clears the environment,
//! closes stray descriptors and `exec`s `/reddog-vmm --config /vm.json`.
//! The jailer then writes the VMM's host pid and start time to a pid file
//! and exits: the VMM runs on, not its child (its caller watches it by pid
//! and start time).
//!
//! Rules: no tokio and no VMM internals (only the `vmm-api` contract); one
//! thread (it forks).

#![allow(unsafe_code)]

pub mod cgroup;
mod jail;

use std::path::{Path, PathBuf};

pub use jail::{start, wait_and_forward, Started};

/// The jail's paths as the VMM sees them.
pub mod inside {
    /// The `reddog-vmm` binary.
    pub const VMM: &str = "/reddog-vmm";
    /// The rewritten VM config.
    pub const CONFIG: &str = "/vm.json";
    /// The VM's writable socket directory (the host's run directory).
    pub const RUN: &str = "/run";
    /// Where the VMM writes its exit report (in [`RUN`]).
    pub const EXIT_REPORT: &str = "/run/exit-report.json";
    /// The serial console file, when the serial goes to a file.
    pub const SERIAL: &str = "/serial.log";
    /// The kernel.
    pub const KERNEL: &str = "/kernel";
    /// The initrd.
    pub const INITRD: &str = "/initrd";
}

/// Errors from the jailer.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A setting is refused.
    #[error("{0}")]
    Invalid(String),
    /// The VM config could not be read.
    #[error(transparent)]
    Config(#[from] vmm_api::ConfigError),
    /// A host file or directory step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// Which step.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The cgroup.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// The jailed child failed before it could run the VMM.
    #[error("the jailed VMM could not start: {0}")]
    Child(String),
}

/// rlimits of the jailed VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    /// `RLIMIT_NOFILE`: descriptors (disks, eventfds, vCPUs and one per vsock
    /// connection).
    pub nofile: u64,
    /// `RLIMIT_FSIZE`, bytes: the largest file it may write. `None`: the
    /// larger of [`DEFAULT_LOG_FSIZE`] and the largest its writable disks
    /// can grow to.
    pub fsize: Option<u64>,
    /// `RLIMIT_NPROC`: threads of its uid.
    pub nproc: u64,
}

/// The smallest `RLIMIT_FSIZE`: room for `vmm.log` and `serial.log`.
pub const DEFAULT_LOG_FSIZE: u64 = 64 << 20;

impl Default for Rlimits {
    fn default() -> Self {
        Self {
            nofile: 2048,
            fsize: None,
            nproc: 256,
        }
    }
}

/// The cgroup settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupConfig {
    /// The cgroup filesystem root.
    pub root: PathBuf,
    /// The parent of every VM's cgroup (relative), e.g. `reddog`.
    pub parent: PathBuf,
    /// Memory the VMM itself may use beside the guest's, MiB.
    pub vmm_overhead_mib: u64,
    /// Most tasks in the cgroup.
    pub pids_max: u64,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        Self {
            root: "/sys/fs/cgroup".into(),
            parent: "reddog".into(),
            vmm_overhead_mib: 128,
            pids_max: 256,
        }
    }
}

impl CgroupConfig {
    /// The cgroup of instance `id` (layout detected now).
    pub fn cgroup(&self, id: &str) -> Result<cgroup::Cgroup, cgroup::CgroupError> {
        cgroup::Cgroup::detect(&self.root, &self.parent.join(id))
    }
}

/// Everything one jailed VMM needs.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// The instance id: the jail's directory and cgroup name.
    pub id: String,
    /// The VMM's uid (never 0).
    pub uid: u32,
    /// The VMM's gid (never 0).
    pub gid: u32,
    /// The jails' base directory: this VM's jail is `<base>/<id>`.
    pub base: PathBuf,
    /// The VM's socket directory on the host, the jail's `/run`:
    /// `api_sock` and the vsock socket must lie in it. `<base>/<id>/run`
    /// when `None`.
    pub run_dir: Option<PathBuf>,
    /// The `reddog-vmm` binary (statically linked: the jail has no libraries).
    pub vmm: PathBuf,
    /// The VM config with host paths.
    pub config: PathBuf,
    /// The cgroup.
    pub cgroup: CgroupConfig,
    /// The rlimits.
    pub rlimits: Rlimits,
    /// A new network namespace too (the VM's TAPs must then be passed as fds).
    pub new_net: bool,
}

/// A VM's jail on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `<base>/<id>`.
    pub dir: PathBuf,
    /// `<base>/<id>/root`: the jail root's mount point (empty on the host:
    /// the jail's mounts exist only in its own mount namespace).
    pub root: PathBuf,
    /// `<base>/<id>/vmm.pid`: `<pid> <start time>` of the running VMM.
    pub pid_file: PathBuf,
    /// The socket directory (the jail's `/run`).
    pub run_dir: PathBuf,
}

impl Layout {
    /// The layout of instance `id`'s jail.
    pub fn new(base: &Path, id: &str, run_dir: Option<&Path>) -> Self {
        let dir = base.join(id);
        Self {
            root: dir.join("root"),
            pid_file: dir.join("vmm.pid"),
            run_dir: run_dir.map_or_else(|| dir.join("run"), Path::to_owned),
            dir,
        }
    }

    /// Where the jail's exit report is on the host.
    pub fn exit_report(&self) -> PathBuf {
        self.run_dir.join("exit-report.json")
    }

    /// The pid and start time in the pid file, if it holds them.
    pub fn read_pid_file(&self) -> Option<(i32, u64)> {
        let text = std::fs::read_to_string(&self.pid_file).ok()?;
        let mut it = text.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start = it.next()?.parse().ok()?;
        Some((pid, start))
    }
}

/// Checks an instance id: a single path part of `[A-Za-z0-9._-]`, at most 64
/// bytes, not `.` or `..`.
pub fn check_id(id: &str) -> Result<(), JailError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(JailError::Invalid(format!(
            "instance id {id:?} must be 1 to 64 bytes of [A-Za-z0-9._-] (not . or ..)"
        )))
    }
}

/// Removes instance `id`'s jail: its cgroup (the VMM must have exited) and
/// its directory (and the run directory when it lies in the jail). The jail's
/// mounts live only in the VMM's mount namespace, so nothing is mounted here;
/// the removal still never crosses into another filesystem.
pub fn remove(base: &Path, id: &str, cgroup: &CgroupConfig) -> Result<(), JailError> {
    check_id(id)?;
    match cgroup.cgroup(id) {
        Ok(cg) => cg.remove()?,
        // No cgroup hierarchy at all: nothing was created there.
        Err(cgroup::CgroupError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let layout = Layout::new(base, id, None);
    remove_tree_one_fs(&layout.dir)
}

/// `rm -r` that stops at mount points: a directory on another device is
/// refused, not emptied.
pub fn remove_tree_one_fs(dir: &Path) -> Result<(), JailError> {
    use std::os::unix::fs::MetadataExt;
    fn err<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> JailError + 'a {
        move |source| JailError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
    let top = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err("cannot stat", dir)(e)),
    };
    fn walk(dir: &Path, dev: u64, err_dir: &Path) -> Result<(), JailError> {
        let rd = std::fs::read_dir(dir).map_err(|source| JailError::Io {
            what: "cannot list",
            path: err_dir.to_owned(),
            source,
        })?;
        for e in rd {
            let e = e.map_err(|source| JailError::Io {
                what: "cannot list",
                path: dir.to_owned(),
                source,
            })?;
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).map_err(|source| JailError::Io {
                what: "cannot stat",
                path: p.clone(),
                source,
            })?;
            if m.dev() != dev {
                return Err(JailError::Invalid(format!(
                    "{} is on another filesystem (a mount left behind?); not removing it: \
                     unmount it and remove the jail by hand",
                    p.display()
                )));
            }
            if m.is_dir() {
                walk(&p, dev, &p)?;
                std::fs::remove_dir(&p).map_err(|source| JailError::Io {
                    what: "cannot remove",
                    path: p.clone(),
                    source,
                })?;
            } else {
                std::fs::remove_file(&p).map_err(|source| JailError::Io {
                    what: "cannot remove",
                    path: p.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }
    if !top.is_dir() {
        return std::fs::remove_file(dir).map_err(err("cannot remove", dir));
    }
    walk(dir, top.dev(), dir)?;
    std::fs::remove_dir(dir).map_err(err("cannot remove", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_single_safe_path_parts() {
        for good in ["vm-1", "a.b_c", "X9"] {
            check_id(good).expect(good);
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pid_file_and_removal() {
        let d = tempfile::tempdir().expect("tempdir");
        let l = Layout::new(d.path(), "vm", None);
        assert_eq!(l.read_pid_file(), None);
        std::fs::create_dir_all(l.root.join("x")).expect("mkdir");
        std::fs::write(&l.pid_file, "42 777\n").expect("write");
        assert_eq!(l.read_pid_file(), Some((42, 777)));
        remove_tree_one_fs(&l.dir).expect("remove");
        assert!(!l.dir.exists());
        remove_tree_one_fs(&l.dir).expect("absent is removed");
    }
}
