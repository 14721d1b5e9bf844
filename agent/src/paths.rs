//! Paths the agent takes from its callers (a goal's `role_package`, the file
//! of a `POST /v1/images` import): confined to configured roots and opened
//! without following symlinks.
//!
//! [`Roots::confine`] refuses a relative path, canonicalizes the path and
//! refuses it unless it lies under one of the (canonicalized) roots;
//! [`Confined::open`] then opens it again from the root one component at a
//! time with `O_NOFOLLOW`, so a component swapped for a symlink after the
//! check is refused, not followed.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// Why a caller's path was refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// Not absolute.
    #[error("{what} {path:?} is a relative path; give an absolute path under {roots}")]
    Relative {
        /// What the path is for.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// The roots, for the message.
        roots: String,
    },
    /// No roots configured.
    #[error("{what} {path:?} is refused: no {what} roots are configured; start reddog-agent with --{flag} DIR (AgentConfig::{field})")]
    NoRoots {
        /// What the path is for.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// The daemon's flag.
        flag: &'static str,
        /// The config field.
        field: &'static str,
    },
    /// Resolves outside every root.
    #[error("{what} {path:?} resolves to {resolved:?}, outside the allowed roots {roots}; put it under one of them or add a root (reddog-agent --{flag})")]
    Outside {
        /// What the path is for.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// Where it resolves to.
        resolved: PathBuf,
        /// The roots, for the message.
        roots: String,
        /// The daemon's flag.
        flag: &'static str,
    },
    /// It cannot be resolved or opened (missing, a symlink swapped in, ...).
    #[error("{what} {path:?}: {source}")]
    Io {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The directories paths of one kind must lie under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    what: &'static str,
    flag: &'static str,
    field: &'static str,
    dirs: Vec<PathBuf>,
}

/// A path checked to lie under a root: the canonical root and the path
/// relative to it (only normal components).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confined {
    /// The canonical root it lies under.
    pub root: PathBuf,
    /// The path below the root (empty for the root itself).
    pub rel: PathBuf,
}

impl Confined {
    /// The canonical path.
    pub fn path(&self) -> PathBuf {
        self.root.join(&self.rel)
    }

    /// Opens the path from its root, every component with `O_NOFOLLOW`
    /// (`flags` for the last one; `O_CLOEXEC | O_NOFOLLOW` are added), so a
    /// symlink anywhere below the root fails (`ELOOP` or `ENOTDIR`) instead
    /// of being followed.
    pub fn open(&self, flags: OFlags) -> std::io::Result<OwnedFd> {
        let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let last_flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let comps: Vec<&std::ffi::OsStr> = self
            .rel
            .components()
            .map(|c| match c {
                Component::Normal(n) => Ok(n),
                _ => Err(std::io::Error::other("not a plain relative path")),
            })
            .collect::<Result<_, _>>()?;
        if comps.is_empty() {
            return Ok(rustix::fs::open(&self.root, last_flags, Mode::empty())?);
        }
        let mut dir = rustix::fs::open(&self.root, dir_flags, Mode::empty())?;
        for (i, c) in comps.iter().enumerate() {
            let f = if i + 1 == comps.len() {
                last_flags
            } else {
                dir_flags
            };
            dir = rustix::fs::openat(&dir, *c, f, Mode::empty()).map_err(|e| {
                if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR {
                    std::io::Error::other(format!(
                        "{} is a symlink or not a directory (paths are opened without following symlinks)",
                        self.root.join(comps[..=i].iter().collect::<PathBuf>()).display()
                    ))
                } else {
                    e.into()
                }
            })?;
        }
        Ok(dir)
    }
}

impl Roots {
    /// Roots for role packages (`--role-root`).
    pub fn role(dirs: Vec<PathBuf>) -> Self {
        Self {
            what: "role_package",
            flag: "role-root",
            field: "role_roots",
            dirs,
        }
    }

    /// Roots for imported image files (`--import-root`).
    pub fn import(dirs: Vec<PathBuf>) -> Self {
        Self {
            what: "import path",
            flag: "import-root",
            field: "import_roots",
            dirs,
        }
    }

    /// The roots as configured.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn shown(&self) -> String {
        let v: Vec<String> = self
            .dirs
            .iter()
            .map(|d| format!("{:?}", d.display().to_string()))
            .collect();
        format!("[{}]", v.join(", "))
    }

    /// Checks `path`: absolute, and once canonicalized (`..` and symlinks
    /// resolved) under one of the roots (each canonicalized too; a missing
    /// root matches nothing).
    pub fn confine(&self, path: &Path) -> Result<Confined, PathError> {
        if self.dirs.is_empty() {
            return Err(PathError::NoRoots {
                what: self.what,
                path: path.to_owned(),
                flag: self.flag,
                field: self.field,
            });
        }
        if !path.is_absolute() {
            return Err(PathError::Relative {
                what: self.what,
                path: path.to_owned(),
                roots: self.shown(),
            });
        }
        let resolved = std::fs::canonicalize(path).map_err(|source| PathError::Io {
            what: self.what,
            path: path.to_owned(),
            source,
        })?;
        for d in &self.dirs {
            let Ok(root) = std::fs::canonicalize(d) else {
                continue;
            };
            if let Ok(rel) = resolved.strip_prefix(&root) {
                return Ok(Confined {
                    rel: rel.to_owned(),
                    root,
                });
            }
        }
        Err(PathError::Outside {
            what: self.what,
            path: path.to_owned(),
            resolved,
            roots: self.shown(),
            flag: self.flag,
        })
    }

    /// [`Roots::confine`], then [`Confined::open`] with `flags`.
    pub fn open(&self, path: &Path, flags: OFlags) -> Result<(Confined, OwnedFd), PathError> {
        let c = self.confine(path)?;
        let fd = c.open(flags).map_err(|source| PathError::Io {
            what: self.what,
            path: c.path(),
            source,
        })?;
        Ok((c, fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_outside_and_symlinked_paths_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("allowed");
        std::fs::create_dir_all(root.join("pkg/sub")).expect("mkdir");
        std::fs::write(root.join("pkg/sub/f"), b"x").expect("write");
        std::fs::write(dir.path().join("secret"), b"s").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).expect("ln");
        std::os::unix::fs::symlink(root.join("pkg"), root.join("in")).expect("ln");
        let roots = Roots::import(vec![root.clone()]);

        let e = roots
            .confine(Path::new("../../etc/passwd"))
            .expect_err("relative");
        assert!(matches!(e, PathError::Relative { .. }), "{e}");
        let up = root.join("../../../../../../etc");
        let e = roots.confine(&up).expect_err("outside");
        assert!(matches!(e, PathError::Outside { .. }), "{e}");
        assert!(e.to_string().contains(&root.display().to_string()), "{e}");
        let e = roots.confine(&root.join("out")).expect_err("symlink out");
        assert!(matches!(e, PathError::Outside { .. }), "{e}");
        let e = Roots::role(vec![])
            .confine(&root.join("pkg"))
            .expect_err("no roots");
        assert!(e.to_string().contains("--role-root"), "{e}");

        // Inside, with `..` that stays inside: allowed, canonical.
        let c = roots
            .confine(&root.join("pkg/sub/../sub/f"))
            .expect("inside");
        assert_eq!(c.rel, Path::new("pkg/sub/f"));
        c.open(OFlags::RDONLY).expect("open");
        // A symlink inside the root to inside: resolved, then opened by its
        // canonical path.
        let c = roots.confine(&root.join("in/sub/f")).expect("inside");
        assert_eq!(c.rel, Path::new("pkg/sub/f"));
        // A component swapped for a symlink after the check is not followed.
        std::fs::rename(root.join("pkg"), root.join("pkg.real")).expect("mv");
        std::os::unix::fs::symlink(root.join("pkg.real"), root.join("pkg")).expect("ln");
        let e = c.open(OFlags::RDONLY).expect_err("swapped");
        assert!(e.to_string().contains("symlink"), "{e}");
    }
}
