//! Debian kernels (fetched with apt, checked against apt's sha256 and cached
//! outside git), the apt helpers behind them, the cache root and the static
//! busybox.
//!
//! A kernel comes from a [`KernelSource`]: Debian's cloud kernel (the
//! default), any Debian kernel package by name (a metapackage such as
//! `linux-image-amd64` is followed to the kernel it depends on), a local
//! `.deb`, or a `vmlinuz` plus its modules directory. The `vmlinux` (PVH
//! entry) is extracted from the bzImage when its compression is one
//! [`crate::bzimage`] reads (LZ4, as Debian's cloud kernel); otherwise the
//! kernel boots as the bzImage only, through the 64-bit boot protocol
//! ([`KernelArtifacts::entries`] says which).
//!
//! Cache layout: `${REDDOG_CACHE:-$HOME/.cache/reddog}/kernels/<sha256 of the .deb>/`
//! holding `root/` (the extracted package), `vmlinux` and `kernel.json`. A cache
//! entry is built in a private temporary directory next to it and renamed into
//! place, so concurrent callers never see half an entry: the loser of a race
//! throws its copy away.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::bzimage::{self, BzImageError};
use crate::elf::{self, Elf, ElfError};

/// The metapackage whose dependency names the current cloud kernel.
const CLOUD_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Errors fetching, caching or checking artifacts (and running the tools
/// behind them: apt, dpkg-deb, cargo).
#[derive(Debug, Error)]
pub enum ArtifactError {
    #[error(
        "neither REDDOG_CACHE nor HOME is set: set REDDOG_CACHE to a directory for cached artifacts"
    )]
    NoCacheDir,
    #[error("could not run `{cmd}`: {source}. Install it (see .ci/install-deps)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("apt knows no {what}, even after `apt-get update`: check /etc/apt/sources.list has Debian 12 (bookworm) main and bookworm-security")]
    NoPackage { what: String },
    #[error("downloaded {file} has sha256 {actual}, apt lists {expected}: the download is corrupt; run the test again")]
    HashMismatch {
        file: String,
        actual: String,
        expected: String,
    },
    #[error("the kernel package lacks {0}: is this a Debian linux-image package?")]
    PackageLayout(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    BzImage {
        path: PathBuf,
        #[source]
        source: BzImageError,
    },
    #[error("{path}: {source}")]
    Elf {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error("{path} is dynamically linked; the machine it runs in has no libraries: {fix}")]
    NotStatic { path: PathBuf, fix: &'static str },
    #[error("kernel module {name} not found under {dir}: does this kernel build it as a module?")]
    NoModule { name: String, dir: PathBuf },
    #[error("the cache entry {path} is unreadable ({what}): delete the directory and run again")]
    BadCacheEntry { path: PathBuf, what: String },
    #[error("kernel flags: {0}")]
    KernelFlags(String),
    #[error("{kernel} has no vmlinux for the PVH entry ({why}): boot its bzImage {vmlinuz} (64-bit boot protocol) instead")]
    NoVmlinux {
        kernel: String,
        vmlinuz: PathBuf,
        why: String,
    },
}

/// Maps an I/O error on `path` to [`ArtifactError::Io`].
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_owned(),
        source,
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` and returns its output when it exits 0 (otherwise
/// [`ArtifactError::Command`] with the tail of its stderr).
pub fn run(cmd: &mut Command) -> Result<Output, ArtifactError> {
    let out = cmd.output().map_err(|source| ArtifactError::Spawn {
        cmd: describe(cmd),
        source,
    })?;
    if out.status.success() {
        Ok(out)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        Err(ArtifactError::Command {
            cmd: describe(cmd),
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        })
    }
}

/// `${REDDOG_CACHE:-$HOME/.cache/reddog}`.
pub fn cache_root() -> Result<PathBuf, ArtifactError> {
    if let Some(dir) = std::env::var_os("REDDOG_CACHE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or(ArtifactError::NoCacheDir)?;
    Ok(PathBuf::from(home).join(".cache/reddog"))
}

/// Where a kernel comes from (`reddog image kernel`'s flags).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KernelSource {
    /// Debian 12's current stock cloud kernel (behind `linux-image-cloud-amd64`).
    #[default]
    Cloud,
    /// A Debian kernel package by name, fetched with apt: a kernel
    /// (`linux-image-6.1.0-56-amd64`) or a metapackage naming one
    /// (`linux-image-amd64`, the generic kernel).
    Package(String),
    /// A local kernel `.deb`.
    Deb(PathBuf),
    /// A bzImage and its `/lib/modules/<release>` directory.
    Files {
        /// The bzImage.
        vmlinuz: PathBuf,
        /// The modules directory (its name is the release).
        modules_dir: PathBuf,
    },
}

impl KernelSource {
    /// The source the flags name: at most one of `package`, `deb` and
    /// `vmlinuz` (which needs `modules`); none is the cloud kernel.
    pub fn from_flags(
        package: Option<&str>,
        deb: Option<&Path>,
        vmlinuz: Option<&Path>,
        modules: Option<&Path>,
    ) -> Result<Self, ArtifactError> {
        let bad = |why: &str| ArtifactError::KernelFlags(why.to_owned());
        match (package, deb, vmlinuz, modules) {
            (None, None, None, None) => Ok(Self::Cloud),
            (Some(p), None, None, None) => {
                let ok = p.starts_with("linux-image-")
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-+.".contains(&b));
                if ok {
                    Ok(Self::Package(p.to_owned()))
                } else {
                    Err(bad(
                        "a kernel package is named linux-image-... (e.g. linux-image-amd64)",
                    ))
                }
            }
            (None, Some(d), None, None) => Ok(Self::Deb(d.to_owned())),
            (None, None, Some(v), Some(m)) => Ok(Self::Files {
                vmlinuz: v.to_owned(),
                modules_dir: m.to_owned(),
            }),
            (None, None, Some(_), None) => Err(bad(
                "--vmlinuz needs --modules DIR (its /lib/modules/<release> directory)",
            )),
            (None, None, None, Some(_)) => Err(bad("--modules goes with --vmlinuz FILE")),
            _ => Err(bad(
                "give one of --package NAME, --deb FILE or --vmlinuz FILE --modules DIR",
            )),
        }
    }
}

/// A Debian kernel, extracted.
#[derive(Debug, Clone)]
pub struct KernelArtifacts {
    /// The Debian package, e.g. `linux-image-6.1.0-56-cloud-amd64-unsigned`.
    pub package: String,
    /// Its Debian version, e.g. `6.1.192-2`.
    pub version: String,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// sha256 of the `.deb` (also the cache directory's name).
    pub deb_sha256: String,
    /// The cache directory holding everything below.
    pub dir: PathBuf,
    /// The bzImage (`/boot/vmlinuz-<release>`).
    pub vmlinuz: PathBuf,
    /// The uncompressed ELF kernel with its PVH note, extracted from the
    /// bzImage; `None` when it could not be (see `vmlinux_error`): boot the
    /// bzImage instead.
    pub vmlinux: Option<PathBuf>,
    /// Why there is no `vmlinux`.
    pub vmlinux_error: Option<String>,
    /// `/lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

/// A kernel module ready to load (decompressed if the package compressed it).
#[derive(Debug, Clone)]
pub struct Module {
    /// The module name with underscores (`kvm_amd`).
    pub name: String,
    pub bytes: Vec<u8>,
}

fn module_name(file: &OsStr) -> Option<String> {
    let f = file.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| f.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

fn walk(dir: &Path, out: &mut HashMap<String, PathBuf>) -> Result<(), ArtifactError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err(&path))?;
        if kind.is_dir() {
            walk(&path, out)?;
        } else if let Some(name) = module_name(&entry.file_name()) {
            out.entry(name).or_insert(path);
        }
    }
    Ok(())
}

/// Reads a module file, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz` with the
/// usual command-line tools.
fn read_module(path: &Path) -> Result<Vec<u8>, ArtifactError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).map_err(io_err(path)),
        Some(tool) => Ok(run(Command::new(tool).arg("-dc").arg(path))?.stdout),
    }
}

impl KernelArtifacts {
    /// The `vmlinux` for the PVH entry, or [`ArtifactError::NoVmlinux`]
    /// saying to boot the bzImage.
    pub fn pvh_vmlinux(&self) -> Result<&Path, ArtifactError> {
        self.vmlinux
            .as_deref()
            .ok_or_else(|| ArtifactError::NoVmlinux {
                kernel: format!("{} {}", self.package, self.release),
                vmlinuz: self.vmlinuz.clone(),
                why: self
                    .vmlinux_error
                    .clone()
                    .unwrap_or_else(|| "not extracted".into()),
            })
    }

    /// The entry protocols this kernel supports, for people:
    /// `"pvh (vmlinux), linux-64 (bzImage)"` or `"linux-64 (bzImage)"`.
    pub fn entries(&self) -> &'static str {
        if self.vmlinux.is_some() {
            "pvh (vmlinux), linux-64 (bzImage)"
        } else {
            "linux-64 (bzImage)"
        }
    }

    /// Checks the entry is usable: the bzImage has a boot-protocol setup header
    /// with its payload inside the file, and `vmlinux` (when there is one) is an
    /// x86_64 ELF carrying the PVH entry note. Reads both files (some tens of MiB).
    pub fn verify(&self) -> Result<(), ArtifactError> {
        let bz = fs::read(&self.vmlinuz).map_err(io_err(&self.vmlinuz))?;
        bzimage::payload(&bz).map_err(|source| ArtifactError::BzImage {
            path: self.vmlinuz.clone(),
            source,
        })?;
        let Some(vmlinux) = &self.vmlinux else {
            return Ok(());
        };
        let bytes = fs::read(vmlinux).map_err(io_err(vmlinux))?;
        let elf_err = |source| ArtifactError::Elf {
            path: vmlinux.clone(),
            source,
        };
        let pvh = Elf::parse(&bytes)
            .and_then(|e| e.has_pvh_note())
            .map_err(elf_err)?;
        if !pvh {
            return Err(ArtifactError::BadCacheEntry {
                path: self.dir.clone(),
                what: format!("{} has no PVH entry note", vmlinux.display()),
            });
        }
        Ok(())
    }

    /// `modules` and everything they depend on (from each module's `.modinfo`
    /// `depends=`), in an order `insmod` can load them.
    pub fn modules_with_deps(&self, modules: &[&str]) -> Result<Vec<Module>, ArtifactError> {
        let mut index = HashMap::new();
        walk(&self.modules_dir, &mut index)?;
        let mut order: Vec<Module> = Vec::new();
        for m in modules {
            self.visit(&m.replace('-', "_"), &index, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        index: &HashMap<String, PathBuf>,
        order: &mut Vec<Module>,
        depth: usize,
    ) -> Result<(), ArtifactError> {
        if order.iter().any(|m| m.name == name) {
            return Ok(());
        }
        let path = index.get(name).ok_or_else(|| ArtifactError::NoModule {
            name: name.to_owned(),
            dir: self.modules_dir.clone(),
        })?;
        let bytes = read_module(path)?;
        let deps = elf::module_depends(&bytes).map_err(|source| ArtifactError::Elf {
            path: path.clone(),
            source,
        })?;
        if depth < 16 {
            for d in deps {
                self.visit(&d, index, order, depth + 1)?;
            }
        }
        order.push(Module {
            name: name.to_owned(),
            bytes,
        });
        Ok(())
    }
}

/// A package apt can fetch: name, candidate version, the archive's sha256.
#[derive(Debug, Clone)]
pub struct AptPackage {
    /// The package name.
    pub name: String,
    /// The candidate version.
    pub version: String,
    /// The `.deb`'s sha256 as the archive's index lists it (lowercase hex).
    pub sha256: String,
}

/// `apt-get update`.
pub fn apt_update() -> Result<(), ArtifactError> {
    run(Command::new("apt-get").args(["update", "-q"])).map(|_| ())
}

/// The `linux-image-*` package an `apt-cache depends` listing depends on
/// (what a kernel metapackage points at), if any.
fn kernel_dependency(depends: &str) -> Option<String> {
    depends.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('<').trim_end_matches('>');
        dep.starts_with("linux-image-").then(|| dep.to_owned())
    })
}

/// `apt-cache depends package`, or `None` if apt does not know it.
fn apt_depends(package: &str) -> Result<Option<String>, ArtifactError> {
    match run(Command::new("apt-cache").args(["depends", package])) {
        Ok(out) => Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())),
        Err(ArtifactError::Command { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The current cloud kernel's unsigned package name, from the metapackage's dependency.
fn cloud_kernel_package() -> Result<Option<String>, ArtifactError> {
    Ok(apt_depends(CLOUD_METAPACKAGE)?
        .and_then(|t| kernel_dependency(&t))
        .filter(|d| d.ends_with("-cloud-amd64"))
        .map(|d| format!("{d}-unsigned")))
}

/// The kernel package behind `name`: `name` itself if it is a kernel, else
/// the kernel its metapackage depends on (followed at most 3 times).
fn named_kernel_package(name: &str) -> Result<Option<String>, ArtifactError> {
    let mut at = name.to_owned();
    for _ in 0..3 {
        let Some(deps) = apt_depends(&at)? else {
            return Ok(None);
        };
        match kernel_dependency(&deps) {
            Some(next) => at = next,
            None => return Ok(Some(at)),
        }
    }
    Ok(Some(at))
}

/// The candidate version of `package` as `apt-cache show` knows it, or `None`
/// when apt does not know it (run [`apt_update`] and ask again).
pub fn apt_show(package: &str) -> Result<Option<AptPackage>, ArtifactError> {
    let out = match run(Command::new("apt-cache").args(["show", "--no-all-versions", package])) {
        Ok(out) => out,
        Err(ArtifactError::Command { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
    };
    match (field("Version:"), field("SHA256:")) {
        (Some(version), Some(sha256)) => Ok(Some(AptPackage {
            name: package.to_owned(),
            version,
            sha256: sha256.to_ascii_lowercase(),
        })),
        _ => Ok(None),
    }
}

/// `package`: `None` for the cloud kernel, else a package name.
fn resolve_kernel_package(package: Option<&str>) -> Result<AptPackage, ArtifactError> {
    let lookup = || -> Result<Option<AptPackage>, ArtifactError> {
        let name = match package {
            None => cloud_kernel_package()?,
            Some(p) => named_kernel_package(p)?,
        };
        match name {
            Some(p) => apt_show(&p),
            None => Ok(None),
        }
    };
    if let Some(p) = lookup()? {
        return Ok(p);
    }
    apt_update()?;
    lookup()?.ok_or_else(|| ArtifactError::NoPackage {
        what: match package {
            None => format!("unsigned package behind {CLOUD_METAPACKAGE}"),
            Some(p) => format!("kernel package {p}"),
        },
    })
}

/// The sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, ArtifactError> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A suffix unique to this process and moment, for temporary names.
pub fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

const METADATA: &str = "kernel.json";

/// What `kernel.json` records; paths are derived from the entry's directory.
#[derive(Serialize, Deserialize)]
struct CacheMeta {
    package: String,
    version: String,
    release: String,
    deb_sha256: String,
    /// Why there is no `vmlinux` (absent in entries from before it could fail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vmlinux_error: Option<String>,
}

fn load_entry(dir: &Path) -> Result<KernelArtifacts, ArtifactError> {
    let meta = dir.join(METADATA);
    let text = fs::read_to_string(&meta).map_err(io_err(&meta))?;
    let m: CacheMeta = serde_json::from_str(&text).map_err(|e| ArtifactError::BadCacheEntry {
        path: dir.to_owned(),
        what: e.to_string(),
    })?;
    let k = KernelArtifacts {
        dir: dir.to_owned(),
        vmlinuz: dir.join("root/boot").join(format!("vmlinuz-{}", m.release)),
        vmlinux: m.vmlinux_error.is_none().then(|| dir.join("vmlinux")),
        vmlinux_error: m.vmlinux_error,
        modules_dir: dir.join("root/lib/modules").join(&m.release),
        package: m.package,
        version: m.version,
        release: m.release,
        deb_sha256: m.deb_sha256,
    };
    for p in [Some(&k.vmlinuz), k.vmlinux.as_ref(), Some(&k.modules_dir)]
        .into_iter()
        .flatten()
    {
        if !p.exists() {
            return Err(ArtifactError::BadCacheEntry {
                path: dir.to_owned(),
                what: format!("{} is missing", p.display()),
            });
        }
    }
    Ok(k)
}

/// Builds a cache entry for `pkg` in `tmp` (which the caller renames into place).
fn build_entry(pkg: &AptPackage, tmp: &Path) -> Result<(), ArtifactError> {
    let spec = format!("{}={}", pkg.name, pkg.version);
    run(Command::new("apt-get")
        .args(["download", "-q", &spec])
        .current_dir(tmp))?;
    let deb = fs::read_dir(tmp)
        .map_err(io_err(tmp))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension() == Some(OsStr::new("deb")))
        .ok_or_else(|| ArtifactError::PackageLayout(format!("a .deb in {}", tmp.display())))?;
    let actual = sha256_file(&deb)?;
    if actual != pkg.sha256 {
        return Err(ArtifactError::HashMismatch {
            file: deb.display().to_string(),
            actual,
            expected: pkg.sha256.clone(),
        });
    }
    unpack_entry(&deb, pkg, tmp)?;
    fs::remove_file(&deb).map_err(io_err(&deb))
}

/// What a local `.deb` is (`dpkg-deb -f`), with its sha256.
fn local_deb(deb: &Path) -> Result<AptPackage, ArtifactError> {
    let out = run(Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .args(["Package", "Version"]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
            .ok_or_else(|| ArtifactError::PackageLayout(format!("a {key} field")))
    };
    Ok(AptPackage {
        name: field("Package:")?,
        version: field("Version:")?,
        sha256: sha256_file(deb)?,
    })
}

/// Tries to get `vmlinux` out of the bzImage `vmlinuz` into `out`; the
/// reason when it cannot (another compression than LZ4, no PVH note).
fn try_vmlinux(vmlinuz: &Path, out: &Path) -> Result<Option<String>, ArtifactError> {
    let bz = fs::read(vmlinuz).map_err(io_err(vmlinuz))?;
    bzimage::payload(&bz).map_err(|source| ArtifactError::BzImage {
        path: vmlinuz.to_owned(),
        source,
    })?;
    match bzimage::extract_vmlinux(&bz) {
        Ok(bytes) => {
            fs::write(out, bytes).map_err(io_err(out))?;
            Ok(None)
        }
        Err(e) => Ok(Some(e.to_string())),
    }
}

/// Unpacks the kernel `.deb` into `tmp/root` and makes the rest of the entry.
fn unpack_entry(deb: &Path, pkg: &AptPackage, tmp: &Path) -> Result<(), ArtifactError> {
    let actual = pkg.sha256.clone();
    let root = tmp.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;

    let boot = root.join("boot");
    let release = fs::read_dir(&boot)
        .map_err(io_err(&boot))?
        .filter_map(Result::ok)
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .ok_or_else(|| ArtifactError::PackageLayout("/boot/vmlinuz-*".into()))?;
    let vmlinuz = boot.join(format!("vmlinuz-{release}"));
    let modules_dir = root.join("lib/modules").join(&release);
    if !modules_dir.is_dir() {
        return Err(ArtifactError::PackageLayout(format!(
            "/lib/modules/{release}"
        )));
    }
    let vmlinux_error = try_vmlinux(&vmlinuz, &tmp.join("vmlinux"))?;
    let m = CacheMeta {
        package: pkg.name.clone(),
        version: pkg.version.clone(),
        release,
        deb_sha256: actual,
        vmlinux_error,
    };
    let meta = tmp.join(METADATA);
    let json = serde_json::to_string_pretty(&m).map_err(|e| ArtifactError::BadCacheEntry {
        path: meta.clone(),
        what: e.to_string(),
    })?;
    fs::write(&meta, json).map_err(io_err(&meta))?;
    Ok(())
}

/// Fetches (once) and returns Debian 12's current stock cloud kernel: the
/// `linux-image-<release>-cloud-amd64-unsigned` package that `linux-image-cloud-amd64`
/// depends on, downloaded by apt (which checks the archive signatures and hash),
/// checked again against apt's sha256, extracted with `dpkg-deb -x`, and its
/// `vmlinux` decompressed from the bzImage. The cache is [`cache_root`].
///
/// Within one process the answer is remembered; across processes the cache
/// entry appears atomically (see the module documentation).
pub fn debian_kernel() -> Result<KernelArtifacts, ArtifactError> {
    debian_kernel_in(&cache_root()?)
}

/// [`debian_kernel`] with the cache rooted at `cache` (its `kernels/`
/// subdirectory holds the entries).
pub fn debian_kernel_in(cache: &Path) -> Result<KernelArtifacts, ArtifactError> {
    kernel_in(&KernelSource::Cloud, cache)
}

/// The kernel `source` names, with the cache rooted at `cache` (packages and
/// `.deb`s are cached by their sha256; a `vmlinuz` with its modules is used
/// where it is, its `vmlinux` cached by the bzImage's sha256).
pub fn kernel_in(source: &KernelSource, cache: &Path) -> Result<KernelArtifacts, ArtifactError> {
    type Known = Vec<(PathBuf, KernelSource, KernelArtifacts)>;
    static KERNELS: std::sync::Mutex<Known> = std::sync::Mutex::new(Vec::new());
    let mut known = KERNELS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, _, k)) = known.iter().find(|(c, s, _)| c == cache && s == source) {
        return Ok(k.clone());
    }
    let k = match source {
        KernelSource::Cloud => fetch_debian_kernel(cache, None)?,
        KernelSource::Package(p) => fetch_debian_kernel(cache, Some(p))?,
        KernelSource::Deb(deb) => {
            let pkg = local_deb(deb)?;
            cached_entry(cache, &pkg, |tmp| unpack_entry(deb, &pkg, tmp))?
        }
        KernelSource::Files {
            vmlinuz,
            modules_dir,
        } => kernel_files(cache, vmlinuz, modules_dir)?,
    };
    known.push((cache.to_owned(), source.clone(), k.clone()));
    Ok(k)
}

fn kernel_files(
    cache: &Path,
    vmlinuz: &Path,
    modules_dir: &Path,
) -> Result<KernelArtifacts, ArtifactError> {
    if !modules_dir.is_dir() {
        return Err(ArtifactError::KernelFlags(format!(
            "--modules {} is not a directory",
            modules_dir.display()
        )));
    }
    let release = modules_dir
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or("")
        .to_owned();
    let sha = sha256_file(vmlinuz)?;
    let dir = cache.join("kernels").join(format!("vmlinuz-{sha}"));
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let vmlinux = dir.join("vmlinux");
    let vmlinux_error = if vmlinux.is_file() {
        None
    } else {
        let tmp = dir.join(format!(".tmp-{}", unique_suffix()));
        let why = try_vmlinux(vmlinuz, &tmp)?;
        if why.is_none() {
            fs::rename(&tmp, &vmlinux).map_err(io_err(&vmlinux))?;
        }
        why
    };
    Ok(KernelArtifacts {
        package: vmlinuz.display().to_string(),
        version: String::new(),
        release,
        deb_sha256: String::new(),
        dir,
        vmlinuz: vmlinuz.to_owned(),
        vmlinux: vmlinux_error.is_none().then_some(vmlinux),
        vmlinux_error,
        modules_dir: modules_dir.to_owned(),
    })
}

fn fetch_debian_kernel(
    cache: &Path,
    package: Option<&str>,
) -> Result<KernelArtifacts, ArtifactError> {
    let pkg = resolve_kernel_package(package)?;
    cached_entry(cache, &pkg, |tmp| build_entry(&pkg, tmp))
}

/// The cache entry for `pkg`, made by `build` in a temporary directory and
/// renamed into place if it is not there yet.
fn cached_entry(
    cache: &Path,
    pkg: &AptPackage,
    build: impl FnOnce(&Path) -> Result<(), ArtifactError>,
) -> Result<KernelArtifacts, ArtifactError> {
    let kernels = cache.join("kernels");
    let final_dir = kernels.join(&pkg.sha256);
    if final_dir.is_dir() {
        return load_entry(&final_dir);
    }
    fs::create_dir_all(&kernels).map_err(io_err(&kernels))?;
    let tmp = kernels.join(format!(".tmp-{}", unique_suffix()));
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    if let Err(e) = build(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, &final_dir) {
        Ok(()) => {}
        Err(_) if final_dir.is_dir() => {
            // Another caller finished first: use theirs.
            let _ = fs::remove_dir_all(&tmp);
        }
        Err(source) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(ArtifactError::Io {
                path: final_dir,
                source,
            });
        }
    }
    load_entry(&final_dir)
}

/// Fails with [`ArtifactError::NotStatic`] (naming `fix`) unless `path` is an
/// ELF file without a program interpreter, i.e. statically linked.
pub fn require_static(path: &Path, fix: &'static str) -> Result<(), ArtifactError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let elf = Elf::parse(&bytes).map_err(|source| ArtifactError::Elf {
        path: path.to_owned(),
        source,
    })?;
    let dynamic = elf.has_interpreter().map_err(|source| ArtifactError::Elf {
        path: path.to_owned(),
        source,
    })?;
    if dynamic {
        return Err(ArtifactError::NotStatic {
            path: path.to_owned(),
            fix,
        });
    }
    Ok(())
}

/// Debian's statically linked busybox (`/bin/busybox` from `busybox-static`).
pub fn busybox_static() -> Result<PathBuf, ArtifactError> {
    let path = PathBuf::from("/bin/busybox");
    if !path.exists() {
        return Err(ArtifactError::Spawn {
            cmd: "/bin/busybox".into(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "apt-get install busybox-static",
            ),
        });
    }
    require_static(
        &path,
        "install busybox-static (not busybox): apt-get install busybox-static",
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_normalised() {
        assert_eq!(
            module_name(OsStr::new("kvm-amd.ko")).as_deref(),
            Some("kvm_amd")
        );
        assert_eq!(module_name(OsStr::new("kvm.ko.xz")).as_deref(), Some("kvm"));
        assert_eq!(
            module_name(OsStr::new("irqbypass.ko.zst")).as_deref(),
            Some("irqbypass")
        );
        assert_eq!(module_name(OsStr::new("modules.dep")), None);
    }

    #[test]
    fn kernel_flags_name_one_source() {
        let p = |s: &str| Some(PathBuf::from(s));
        let f =
            |pkg: Option<&str>, deb: Option<PathBuf>, vz: Option<PathBuf>, m: Option<PathBuf>| {
                KernelSource::from_flags(pkg, deb.as_deref(), vz.as_deref(), m.as_deref())
            };
        assert_eq!(
            f(None, None, None, None).expect("none"),
            KernelSource::Cloud
        );
        assert_eq!(
            f(Some("linux-image-amd64"), None, None, None).expect("package"),
            KernelSource::Package("linux-image-amd64".into())
        );
        assert_eq!(
            f(None, p("/k/linux.deb"), None, None).expect("deb"),
            KernelSource::Deb("/k/linux.deb".into())
        );
        assert_eq!(
            f(
                None,
                None,
                p("/boot/vmlinuz"),
                p("/lib/modules/6.1.0-56-amd64")
            )
            .expect("files"),
            KernelSource::Files {
                vmlinuz: "/boot/vmlinuz".into(),
                modules_dir: "/lib/modules/6.1.0-56-amd64".into()
            }
        );
        let refused = [
            (f(Some("busybox"), None, None, None), "linux-image-"),
            (
                f(Some("linux-image-amd64; rm"), None, None, None),
                "linux-image-",
            ),
            (f(None, None, p("/boot/vmlinuz"), None), "needs --modules"),
            (
                f(None, None, None, p("/lib/modules/x")),
                "goes with --vmlinuz",
            ),
            (
                f(Some("linux-image-amd64"), p("/k.deb"), None, None),
                "one of",
            ),
            (f(None, p("/k.deb"), p("/v"), p("/m")), "one of"),
        ];
        for (r, want) in refused {
            let e = r.expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_metapackage_is_followed_to_its_kernel() {
        let generic = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            kernel_dependency(generic).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let cloud = "linux-image-cloud-amd64\n  Depends: <linux-image-6.1.0-56-cloud-amd64>\n";
        assert_eq!(
            kernel_dependency(cloud).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        // A kernel package depends on no other kernel: it is the kernel.
        let kernel = "linux-image-6.1.0-56-amd64\n  Depends: kmod\n  Depends: linux-base\n  Recommends: firmware-linux-free\n";
        assert_eq!(kernel_dependency(kernel), None);
    }

    #[test]
    fn a_kernel_without_vmlinux_says_to_boot_the_bzimage() {
        let k = KernelArtifacts {
            package: "linux-image-6.1.0-56-amd64".into(),
            version: "6.1.192-2".into(),
            release: "6.1.0-56-amd64".into(),
            deb_sha256: String::new(),
            dir: "/c".into(),
            vmlinuz: "/c/root/boot/vmlinuz-6.1.0-56-amd64".into(),
            vmlinux: None,
            vmlinux_error: Some("the payload is not LZ4 legacy-framed".into()),
            modules_dir: "/c/root/lib/modules/6.1.0-56-amd64".into(),
        };
        assert_eq!(k.entries(), "linux-64 (bzImage)");
        let e = k.pvh_vmlinux().expect_err("no vmlinux").to_string();
        assert!(
            e.contains("LZ4") && e.contains("bzImage") && e.contains("64-bit"),
            "{e}"
        );
        let k = KernelArtifacts {
            vmlinux: Some("/c/vmlinux".into()),
            vmlinux_error: None,
            ..k
        };
        assert_eq!(k.pvh_vmlinux().expect("vmlinux"), Path::new("/c/vmlinux"));
        assert!(k.entries().starts_with("pvh"));
    }

    #[test]
    fn cache_root_prefers_reddog_cache() {
        // Only reads the environment; both branches give an absolute-looking path.
        let root = cache_root().expect("HOME or REDDOG_CACHE is set in tests");
        assert!(root.components().count() > 1);
    }
}
