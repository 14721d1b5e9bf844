//! Resource and role disks: ext4 file systems in sparse raw images, made with `mkfs.ext4`
//! (e2fsprogs).

use crate::error::{err, DiskError, ErrorKind, IoContext, Result};
use crate::raw;
use std::path::Path;
use std::process::Command;

/// Formats `image` ext4 with `label` and `extra` options (lazy inode table and
/// journal initialisation, no reserved blocks); removes the image when that fails,
/// so no half-made disk is left behind.
fn mkfs(image: &Path, label: &str, extra: &[&str]) -> Result<()> {
    let r = run_mkfs(image, label, extra);
    if r.is_err() {
        let _ = std::fs::remove_file(image);
    }
    r
}

/// Runs an e2fsprogs tool (`mkfs.ext4`, `debugfs`) and collects its output;
/// a missing tool is a `NotFound` error that says which package to install.
fn e2fsprogs_output(
    cmd: &mut Command,
    tool: &str,
    op: &'static str,
) -> Result<std::process::Output> {
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            err(
                ErrorKind::NotFound,
                op,
                format!("{tool} is not installed; install e2fsprogs"),
            )
        } else {
            DiskError::io(op, e)
        }
    })
}

fn run_mkfs(image: &Path, label: &str, extra: &[&str]) -> Result<()> {
    let op = "format ext4";
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", label])
        .args(extra)
        .args([
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            "-m",
            "0",
        ])
        .arg(image);
    let out = e2fsprogs_output(&mut cmd, "mkfs.ext4", op).map_err(|e| e.with_path(image))?;
    if !out.status.success() {
        return Err(err(
            ErrorKind::Io,
            op,
            format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )
        .with_path(image));
    }
    Ok(())
}

fn check_label(label: &str) -> Result<()> {
    if label.len() > 16 || label.contains(|c: char| c.is_control()) {
        return Err(err(
            ErrorKind::InvalidArgument,
            "format ext4",
            "an ext4 label is at most 16 bytes without control characters",
        ));
    }
    Ok(())
}

/// Creates a resource disk: a sparse raw image of `size` bytes, formatted ext4 (with lazy
/// inode table and journal initialisation, so it takes well under a second) when `format`
/// is set. Fails if `path` exists.
pub fn create_resource_disk(path: &Path, size: u64, format: bool, label: &str) -> Result<()> {
    check_label(label).map_err(|e| e.with_path(path))?;
    raw::create(path, size)?;
    if format {
        mkfs(path, label, &[])?;
    }
    Ok(())
}

/// Total bytes of regular files and a count of entries under `dir` (symlinks not followed).
fn tree_size(dir: &Path) -> Result<(u64, u64)> {
    let op = "measure role directory";
    let mut bytes = 0u64;
    let mut entries = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ctx_path(op, &d)? {
            let e = e.ctx_path(op, &d)?;
            let m = e.path().symlink_metadata().ctx_path(op, &e.path())?;
            entries += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                bytes += m.len();
            }
        }
    }
    Ok((bytes, entries))
}

/// Creates a role disk: an ext4 image holding a copy of `dir` (`mkfs.ext4 -d`). With no
/// `size`, the image gets the contents' size plus room for metadata and journal.
pub fn create_role_disk(path: &Path, dir: &Path, size: Option<u64>, label: &str) -> Result<()> {
    let op = "create role disk";
    check_label(label).map_err(|e| e.with_path(path))?;
    if !dir.is_dir() {
        return Err(err(
            ErrorKind::NotFound,
            op,
            format!("{} is not a directory", dir.display()),
        )
        .with_path(path));
    }
    let size = match size {
        Some(s) => s,
        None => {
            let (bytes, entries) = tree_size(dir)?;
            // Data rounded up per 4 KiB block, an inode's worth per entry, 20% slack and
            // a floor that leaves room for the journal.
            let est = bytes + entries * 8192;
            let est = (est + est / 5).max(16 << 20) + (8 << 20);
            est.div_ceil(1 << 20) << 20
        }
    };
    raw::create(path, size)?;
    let dir_s = dir.to_str().ok_or_else(|| {
        err(
            ErrorKind::InvalidArgument,
            op,
            "the directory path is not UTF-8",
        )
        .with_path(path)
    })?;
    mkfs(path, label, &["-d", dir_s])
}

/// Longest file name [`add_file`] accepts.
const MAX_ADDED_NAME: usize = 255;

/// Adds one regular file `name` (mode 0644) holding `contents` at the root of the ext4
/// file system in `image` (a raw image, e.g. one made by [`create_role_disk`]), without
/// mounting it: `debugfs -w -R "write ..."` (e2fsprogs). `name` is a plain file name
/// (`[A-Za-z0-9._-]`, not starting with `-` or `.`); a file of that name must not exist
/// yet. The contents are read back afterwards, so a write debugfs only complained about
/// (it exits 0 on most failures) is an error here. On error the image may hold a
/// partial file; treat it as broken and remake it.
pub fn add_file(image: &Path, name: &str, contents: &[u8]) -> Result<()> {
    let op = "add file to ext4 image";
    let name_ok = !name.is_empty()
        && name.len() <= MAX_ADDED_NAME
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !name_ok {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            format!(
                "{name:?} is not a plain file name; use 1 to {MAX_ADDED_NAME} of A-Z, a-z, 0-9, '.', '_', '-', not starting with '.' or '-'"
            ),
        )
        .with_path(image));
    }
    let image_name = image.file_name().ok_or_else(|| {
        err(
            ErrorKind::InvalidArgument,
            op,
            "the image path names no file",
        )
        .with_path(image)
    })?;
    let parent = match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !image.is_file() {
        return Err(err(
            ErrorKind::NotFound,
            op,
            "the image does not exist; create it first (create_role_disk)",
        )
        .with_path(image));
    }
    // debugfs takes its command as one line it splits on blanks, so the source file
    // gets a name of ours in the image's directory and debugfs runs from there.
    let src_name = format!(".{name}.{}.add", std::process::id());
    let src = parent.join(&src_name);
    std::fs::write(&src, contents).ctx_path(op, &src)?;
    // debugfs copies the source's mode: make it 0644 whatever the umask.
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)) {
            let _ = std::fs::remove_file(&src);
            return Err(DiskError::io(op, e).with_path(&src));
        }
    }
    let image_arg = Path::new(".").join(image_name);
    let written = run_debugfs(
        parent,
        // The bare name: debugfs starts in the root directory, and before
        // e2fsprogs 1.47 `write` took the destination literally (a leading
        // '/' became part of the name).
        &["-w", "-R", &format!("write {src_name} {name}")],
        &image_arg,
    );
    let _ = std::fs::remove_file(&src);
    let (_, errors) = written.map_err(|e| e.with_path(image))?;
    if !errors.is_empty() {
        let hint = if errors.contains("already exists") {
            "; the image already holds a file of that name"
        } else {
            ""
        };
        return Err(err(
            ErrorKind::Io,
            op,
            format!("debugfs could not write /{name}: {errors}{hint}"),
        )
        .with_path(image));
    }
    let (back, errors) = run_debugfs(parent, &["-R", &format!("cat /{name}")], &image_arg)
        .map_err(|e| e.with_path(image))?;
    if back != contents {
        return Err(err(
            ErrorKind::Io,
            op,
            format!(
                "/{name} reads back as {} bytes instead of the {} written{}; the image may be full or damaged: remake it",
                back.len(),
                contents.len(),
                if errors.is_empty() { String::new() } else { format!(" ({errors})") }
            ),
        )
        .with_path(image));
    }
    Ok(())
}

/// Runs `debugfs ARGS IMAGE` in `dir`; returns its stdout and its stderr without the
/// version banner (debugfs reports failures there and still exits 0).
fn run_debugfs(dir: &Path, args: &[&str], image: &Path) -> Result<(Vec<u8>, String)> {
    let op = "add file to ext4 image";
    let mut cmd = Command::new("debugfs");
    cmd.current_dir(dir).args(args).arg(image);
    let out = e2fsprogs_output(&mut cmd, "debugfs", op)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_debugfs_banner(l))
        .collect();
    let mut errors = errors.join("; ");
    if !out.status.success() {
        errors = format!("debugfs exited with {}: {errors}", out.status);
    }
    Ok((out.stdout, errors))
}

/// `debugfs 1.47.0 (5-Feb-2023)`.
fn is_debugfs_banner(line: &str) -> bool {
    line.strip_prefix("debugfs ")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debugfs_cat(image: &Path, name: &str) -> (Vec<u8>, String) {
        let dir = image.parent().expect("parent");
        run_debugfs(
            dir,
            &["-R", &format!("cat /{name}")],
            Path::new(image.file_name().expect("name")),
        )
        .expect("debugfs")
    }

    #[test]
    fn add_file_puts_one_file_in_a_role_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pkg = dir.path().join("pkg");
        std::fs::create_dir(&pkg).expect("mkdir");
        std::fs::write(pkg.join("run.sh"), "#!/bin/sh\n").expect("write");
        let img = dir.path().join("role.raw");
        create_role_disk(&img, &pkg, None, "role").expect("role disk");
        let body = br#"{"version":1,"env":{"A":"b c"}}"#;
        add_file(&img, "reddog-instance.json", body).expect("add");
        assert_eq!(debugfs_cat(&img, "reddog-instance.json").0, body);
        // At the root under its own name, mode 0644 (not the umask's).
        let ls = Command::new("debugfs")
            .args(["-R", "ls -l /"])
            .arg(&img)
            .output()
            .expect("debugfs ls");
        let ls = String::from_utf8_lossy(&ls.stdout);
        let line = ls
            .lines()
            .find(|l| l.trim_end().ends_with(" reddog-instance.json"))
            .unwrap_or_else(|| panic!("not listed at the root: {ls}"));
        assert!(line.contains("100644"), "{line}");
        // The package is still there, the file system is consistent and no
        // temporary file is left next to the image.
        assert_eq!(debugfs_cat(&img, "run.sh").0, b"#!/bin/sh\n");
        let fsck = Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&img)
            .output()
            .expect("e2fsck");
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // A second file of the same name is refused, as are odd names and images.
        let e = add_file(&img, "reddog-instance.json", b"x").expect_err("exists");
        assert!(e.to_string().contains("already"), "{e}");
        for bad in ["", "a/b", "a b", "-x", ".hidden", "a\"b"] {
            let e = add_file(&img, bad, b"x").expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
        }
        let e = add_file(&dir.path().join("none.raw"), "a", b"x").expect_err("no image");
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        let junk = dir.path().join("junk.raw");
        std::fs::write(&junk, vec![0u8; 1 << 20]).expect("write");
        let e = add_file(&junk, "a", b"x").expect_err("not ext4");
        assert!(e.to_string().contains("debugfs"), "{e}");
    }
}
