//! One cgroup per VM: CPU, memory and pids limits, on cgroup v1 (one
//! hierarchy per controller, as on this machine kind) or v2 (the unified
//! hierarchy with its controllers), detected at start.

use std::path::{Path, PathBuf};

/// The controllers a VM's cgroup limits.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// The CPU period, microseconds; the quota is this times the vCPUs.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Errors setting up or removing a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither layout was found.
    #[error(
        "no usable cgroup hierarchy under {0}: need cgroup v2 with the cpu, memory and pids \
         controllers, or cgroup v1 with cpu, memory and pids mounted; check `mount -t cgroup,cgroup2`"
    )]
    NotFound(PathBuf),
    /// A file or directory could not be written or removed.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A bad name.
    #[error("cgroup name {0:?} must be relative path parts of [A-Za-z0-9._-]")]
    Name(String),
}

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One hierarchy per controller: `<root>/<controller>/...`.
    V1,
    /// The unified hierarchy at `<root>` with the cpu, memory and pids controllers.
    V2,
}

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU quota, in whole CPUs (the VM's vCPUs).
    pub cpus: u64,
    /// Memory limit, bytes (guest memory plus the VMM's overhead).
    pub memory_bytes: u64,
    /// Most tasks (threads).
    pub pids: u64,
}

/// Where a VM's cgroup is, once detected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// The layout.
    pub layout: Layout,
    /// The cgroup filesystem root (`/sys/fs/cgroup`).
    pub root: PathBuf,
    /// The VM's cgroup below the root (and below each controller on v1),
    /// e.g. `reddog/ab12cd/<instance>`.
    pub name: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io(path))
}

/// Detects the layout under `root`: v2 when `root/cgroup.controllers` lists
/// cpu, memory and pids; v1 when `root/{cpu,memory,pids}` are mounted.
pub fn detect(root: &Path) -> Result<Layout, CgroupError> {
    if let Ok(c) = std::fs::read_to_string(root.join("cgroup.controllers")) {
        let have: Vec<&str> = c.split_whitespace().collect();
        if CONTROLLERS.iter().all(|w| have.contains(w)) {
            return Ok(Layout::V2);
        }
    }
    if CONTROLLERS
        .iter()
        .all(|c| root.join(c).join("cgroup.procs").exists())
    {
        return Ok(Layout::V1);
    }
    Err(CgroupError::NotFound(root.to_owned()))
}

fn check_name(name: &Path) -> Result<(), CgroupError> {
    let bad = || CgroupError::Name(name.display().to_string());
    let s = name.to_str().ok_or_else(bad)?;
    let ok = !s.is_empty()
        && s.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

impl Cgroup {
    /// The cgroup `name` under `root`, its layout detected.
    pub fn detect(root: &Path, name: &Path) -> Result<Self, CgroupError> {
        check_name(name)?;
        Ok(Self {
            layout: detect(root)?,
            root: root.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The VM's cgroup directories (one per controller on v1).
    pub fn dirs(&self) -> Vec<PathBuf> {
        match self.layout {
            Layout::V1 => CONTROLLERS
                .iter()
                .map(|c| self.root.join(c).join(&self.name))
                .collect(),
            Layout::V2 => vec![self.root.join(&self.name)],
        }
    }

    /// Creates the cgroup (again, if a dead VM left it) and sets its limits.
    pub fn create(&self, limits: &Limits) -> Result<(), CgroupError> {
        if self.layout == Layout::V2 {
            // Every ancestor hands the controllers down.
            let mut at = self.root.clone();
            for part in self.name.iter() {
                write(&at.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
                at.push(part);
                std::fs::create_dir_all(&at).map_err(io(&at))?;
            }
        }
        for d in self.dirs() {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let quota = limits.cpus.saturating_mul(CPU_PERIOD_US);
        match self.layout {
            Layout::V1 => {
                let cpu = self.root.join("cpu").join(&self.name);
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                let mem = self.root.join("memory").join(&self.name);
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                let pids = self.root.join("pids").join(&self.name);
                write(&pids.join("pids.max"), &limits.pids.to_string())?;
            }
            Layout::V2 => {
                let d = self.root.join(&self.name);
                write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                // No swap beside the limit: memory.max is the VM's bound.
                let _ = std::fs::write(d.join("memory.swap.max"), "0");
                write(&d.join("pids.max"), &limits.pids.to_string())?;
            }
        }
        Ok(())
    }

    /// Moves the calling process into the cgroup (its children inherit it).
    pub fn join_self(&self) -> Result<(), CgroupError> {
        let me = std::process::id().to_string();
        for d in self.dirs() {
            write(&d.join("cgroup.procs"), &me)?;
        }
        Ok(())
    }

    /// Removes the cgroup; an absent one is removed already. A task that
    /// has just exited leaves it only once reaped, so `EBUSY` is retried for
    /// up to a second; then it fails (a process is still inside).
    pub fn remove(&self) -> Result<(), CgroupError> {
        for d in self.dirs() {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(source) => return Err(CgroupError::Io { path: d, source }),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_relative_parts() {
        for good in ["reddog/a1/vm-1", "x"] {
            check_name(Path::new(good)).expect(good);
        }
        for bad in ["", "/abs", "a/../b", "a/./b", "a b", "a/\u{e9}"] {
            assert!(check_name(Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn detects_v1_and_v2_layouts() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(matches!(detect(d.path()), Err(CgroupError::NotFound(_))));
        std::fs::write(
            d.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .expect("write");
        assert_eq!(detect(d.path()).expect("v2"), Layout::V2);
        // A unified hierarchy without the controllers (this machine kind's
        // /sys/fs/cgroup/unified) is not v2 for us.
        std::fs::write(d.path().join("cgroup.controllers"), "\n").expect("write");
        assert!(detect(d.path()).is_err());
        for c in CONTROLLERS {
            std::fs::create_dir(d.path().join(c)).expect("mkdir");
            std::fs::write(d.path().join(c).join("cgroup.procs"), "").expect("write");
        }
        assert_eq!(detect(d.path()).expect("v1"), Layout::V1);
    }
}
