//! Test artifacts. Debian's kernel, the apt helpers, the cache root and the
//! static busybox are product functionality and live in
//! [`guest_image::artifacts`]; they are re-exported here so tests keep their
//! paths. What stays here is test-only: statically linked builds of this
//! workspace's binaries (`reddog-vmm`, `reddog-guest`, the test drivers) and the
//! host libraries a dynamic program needs.

use std::path::{Path, PathBuf};
use std::process::Command;

pub use guest_image::artifacts::{
    apt_show, apt_update, busybox_static, cache_root, debian_kernel, debian_kernel_in, io_err,
    kernel_in, require_static, run, sha256_file, unique_suffix, AptPackage, ArtifactError,
    KernelArtifacts, KernelSource, Module,
};

const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The shared libraries and the loader a dynamically linked host program
/// needs, as `ldd` lists them (absolute paths; the vDSO left out).
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, ArtifactError> {
    let out = run(Command::new("ldd").arg(program))?;
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)".
            let path = l.split_once("=>").map_or(l, |(_, p)| p.trim());
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// A statically linked `reddog-vmm`, for machines without its libraries.
///
/// `REDDOG_VMM_STATIC=<path>` uses a prebuilt one; otherwise it is built like
/// [`static_bin`].
pub fn static_vmm() -> Result<PathBuf, ArtifactError> {
    if let Some(p) = std::env::var_os("REDDOG_VMM_STATIC").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        require_static(&p, "REDDOG_VMM_STATIC must name a +crt-static build")?;
        return Ok(p);
    }
    static_bin("vmm", "reddog-vmm")
}

/// A statically linked binary `bin` of workspace package `package`, built with
/// `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p <package>
/// --bin <bin> --target x86_64-unknown-linux-gnu` into its own target directory
/// (`REDDOG_STATIC_TARGET_DIR`, default `<target dir>/nested-static`), so it never
/// waits on the lock of the `cargo test` that runs us. Built once per process.
pub fn static_bin(package: &str, bin: &str) -> Result<PathBuf, ArtifactError> {
    static_bin_with_features(package, bin, &[])
}

/// [`static_bin`] with these cargo features of `package` on (for a binary
/// with `required-features`).
pub fn static_bin_with_features(
    package: &str,
    bin: &str,
    features: &[&str],
) -> Result<PathBuf, ArtifactError> {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, p)) = built.iter().find(|(b, _)| b == bin) {
        return Ok(p.clone());
    }
    let p = build_static(package, bin, features)?;
    built.push((bin.to_owned(), p.clone()));
    Ok(p)
}

fn build_static(package: &str, bin: &str, features: &[&str]) -> Result<PathBuf, ArtifactError> {
    let ws = workspace_root();
    let target_dir = match std::env::var_os("REDDOG_STATIC_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(d) => ws.join(d),
        None => {
            let base = std::env::var_os("CARGO_TARGET_DIR")
                .filter(|v| !v.is_empty())
                .map(|d| ws.join(d))
                .unwrap_or_else(|| ws.join("target"));
            base.join("nested-static")
        }
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .args(["build", "--release", "-q", "-p", package, "--bin", bin])
        .args(if features.is_empty() {
            Vec::new()
        } else {
            vec!["--features".to_owned(), features.join(",")]
        })
        .args(["--target", STATIC_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ws)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET"))?;
    let path = target_dir.join(STATIC_TARGET).join("release").join(bin);
    require_static(
        &path,
        "the static build produced a dynamic binary: check RUSTFLAGS",
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibext2fs.so.2 => /lib/x86_64-linux-gnu/libext2fs.so.2 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libext2fs.so.2"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
