//! Debian's stock cloud kernel (fetched with apt, checked against apt's
//! sha256 and cached outside git), the apt helpers behind it, the cache root and
//! the static busybox.
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

/// Debian's stock cloud kernel, extracted.
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
    /// The uncompressed ELF kernel with its PVH note, extracted from the bzImage.
    pub vmlinux: PathBuf,
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
    /// Checks the entry is usable: the bzImage has a boot-protocol setup header
    /// with its payload inside the file, and `vmlinux` is an x86_64 ELF carrying
    /// the PVH entry note. Reads both files (some tens of MiB).
    pub fn verify(&self) -> Result<(), ArtifactError> {
        let bz = fs::read(&self.vmlinuz).map_err(io_err(&self.vmlinuz))?;
        bzimage::payload(&bz).map_err(|source| ArtifactError::BzImage {
            path: self.vmlinuz.clone(),
            source,
        })?;
        let bytes = fs::read(&self.vmlinux).map_err(io_err(&self.vmlinux))?;
        let elf_err = |source| ArtifactError::Elf {
            path: self.vmlinux.clone(),
            source,
        };
        let pvh = Elf::parse(&bytes)
            .and_then(|e| e.has_pvh_note())
            .map_err(elf_err)?;
        if !pvh {
            return Err(ArtifactError::BadCacheEntry {
                path: self.dir.clone(),
                what: format!("{} has no PVH entry note", self.vmlinux.display()),
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

/// The current cloud kernel's unsigned package name, from the metapackage's dependency.
fn cloud_kernel_package() -> Result<Option<String>, ArtifactError> {
    let out = match run(Command::new("apt-cache").args(["depends", CLOUD_METAPACKAGE])) {
        Ok(out) => out,
        Err(ArtifactError::Command { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('<').trim_end_matches('>');
        (dep.starts_with("linux-image-") && dep.ends_with("-cloud-amd64"))
            .then(|| format!("{dep}-unsigned"))
    }))
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

fn resolve_kernel_package() -> Result<AptPackage, ArtifactError> {
    let lookup = || -> Result<Option<AptPackage>, ArtifactError> {
        match cloud_kernel_package()? {
            Some(p) => apt_show(&p),
            None => Ok(None),
        }
    };
    if let Some(p) = lookup()? {
        return Ok(p);
    }
    apt_update()?;
    lookup()?.ok_or_else(|| ArtifactError::NoPackage {
        what: format!("unsigned package behind {CLOUD_METAPACKAGE}"),
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
        vmlinux: dir.join("vmlinux"),
        modules_dir: dir.join("root/lib/modules").join(&m.release),
        package: m.package,
        version: m.version,
        release: m.release,
        deb_sha256: m.deb_sha256,
    };
    for p in [&k.vmlinuz, &k.vmlinux, &k.modules_dir] {
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
    let root = tmp.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::remove_file(&deb).map_err(io_err(&deb))?;

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
    let bz = fs::read(&vmlinuz).map_err(io_err(&vmlinuz))?;
    let vmlinux_bytes = bzimage::extract_vmlinux(&bz).map_err(|source| ArtifactError::BzImage {
        path: vmlinuz.clone(),
        source,
    })?;
    let vmlinux = tmp.join("vmlinux");
    fs::write(&vmlinux, vmlinux_bytes).map_err(io_err(&vmlinux))?;
    let m = CacheMeta {
        package: pkg.name.clone(),
        version: pkg.version.clone(),
        release,
        deb_sha256: actual,
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
    static KERNELS: std::sync::Mutex<Vec<(PathBuf, KernelArtifacts)>> =
        std::sync::Mutex::new(Vec::new());
    let mut known = KERNELS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, k)) = known.iter().find(|(c, _)| c == cache) {
        return Ok(k.clone());
    }
    let k = fetch_debian_kernel(cache)?;
    known.push((cache.to_owned(), k.clone()));
    Ok(k)
}

fn fetch_debian_kernel(cache: &Path) -> Result<KernelArtifacts, ArtifactError> {
    let pkg = resolve_kernel_package()?;
    let kernels = cache.join("kernels");
    let final_dir = kernels.join(&pkg.sha256);
    if final_dir.is_dir() {
        return load_entry(&final_dir);
    }
    fs::create_dir_all(&kernels).map_err(io_err(&kernels))?;
    let tmp = kernels.join(format!(".tmp-{}", unique_suffix()));
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    if let Err(e) = build_entry(&pkg, &tmp) {
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
    fn cache_root_prefers_reddog_cache() {
        // Only reads the environment; both branches give an absolute-looking path.
        let root = cache_root().expect("HOME or REDDOG_CACHE is set in tests");
        assert!(root.components().count() > 1);
    }
}
