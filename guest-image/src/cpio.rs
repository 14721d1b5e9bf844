//! A minimal cpio "newc" (SVR4, no CRC) writer for initramfs images.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex
//! fields), the NUL-terminated name padded to 4 bytes, then the data padded to
//! 4 bytes; the archive ends with a `TRAILER!!!` entry. Linux's initramfs
//! unpacker does not create missing parent directories, so the writer emits
//! them (mode 0755) before the first entry beneath them. Timestamps are 0 and
//! owners root, so the same input gives the same bytes.

use std::collections::HashSet;
use std::io::{self, Write};

use thiserror::Error;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const TRAILER: &str = "TRAILER!!!";

#[derive(Debug, Error)]
pub enum CpioError {
    #[error("bad archive path {0:?}: use a relative or absolute path without \"..\", \".\" or empty components")]
    BadPath(String),
    #[error("{0:?} is already in the archive: add each path once")]
    Duplicate(String),
    #[error("{path:?} is {len} bytes; newc entries hold at most 4 GiB - 1")]
    TooLarge { path: String, len: u64 },
    #[error("writing the archive failed: {0}")]
    Io(#[from] io::Error),
}

/// Streams a newc archive into `W`.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    seen: HashSet<String>,
}

/// Normalises `/a/b/` or `a/b` to `a/b`, refusing `..`, `.` and empty parts.
fn normalise(path: &str) -> Result<String, CpioError> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || trimmed.contains('\0')
    {
        return Err(CpioError::BadPath(path.to_owned()));
    }
    Ok(trimmed.to_owned())
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            seen: HashSet::new(),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> Result<(), CpioError> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write_all(&[0u8; 3][..pad])
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> Result<(), CpioError> {
        let len = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            path: name.to_owned(),
            len: data.len() as u64,
        })?;
        let ino = if name == TRAILER {
            0
        } else {
            let i = self.next_ino;
            self.next_ino += 1;
            i
        };
        let namesize = name.len() as u32 + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{len:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{check:08x}",
            0, 0, 0, 0,
            uid = 0,
            gid = 0,
            mtime = 0,
            check = 0,
        );
        debug_assert_eq!(header.len(), 110);
        self.write_all(header.as_bytes())?;
        self.write_all(name.as_bytes())?;
        self.write_all(&[0])?;
        self.pad4()?;
        self.write_all(data)?;
        self.pad4()
    }

    /// Emits the missing parent directories of `path` (already normalised).
    fn parents(&mut self, path: &str) -> Result<(), CpioError> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let dir = &path[..end + i];
            if self.seen.insert(dir.to_owned()) {
                self.entry(dir, S_IFDIR | 0o755, 2, &[])?;
            }
            end += i + 1;
        }
        Ok(())
    }

    fn claim(&mut self, path: &str) -> Result<String, CpioError> {
        let p = normalise(path)?;
        self.parents(&p)?;
        if !self.seen.insert(p.clone()) {
            return Err(CpioError::Duplicate(p));
        }
        Ok(p)
    }

    /// A directory with permission bits `mode` (e.g. 0o755). Adding a directory
    /// that an earlier entry already created implicitly is allowed and a no-op.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        let p = normalise(path)?;
        self.parents(&p)?;
        if self.seen.insert(p.clone()) {
            self.entry(&p, S_IFDIR | (mode & 0o7777), 2, &[])?;
        }
        Ok(())
    }

    /// A regular file with permission bits `mode` (e.g. 0o755 for a program).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        let p = self.claim(path)?;
        self.entry(&p, S_IFREG | (mode & 0o7777), 1, data)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        let p = self.claim(path)?;
        self.entry(&p, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.entry(TRAILER, 0, 1, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// One parsed header: (name, mode, nlink, data).
    fn parse(mut b: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701", "magic at {offset}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).expect("ascii");
                u32::from_str_radix(s, 16).expect("hex")
            };
            let (mode, nlink, size, namesize) = (field(1), field(4), field(6), field(11));
            let name = std::str::from_utf8(&b[110..110 + namesize as usize - 1])
                .expect("name")
                .to_owned();
            assert_eq!(b[110 + namesize as usize - 1], 0);
            let data_at = (110 + namesize as usize).next_multiple_of(4);
            let data = b[data_at..data_at + size as usize].to_vec();
            let next = (data_at + size as usize).next_multiple_of(4);
            offset += next;
            b = &b[next..];
            if name == TRAILER {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, nlink, data));
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n")
            .expect("init");
        w.file("bin/busybox", 0o755, b"\x7fELF...")
            .expect("busybox");
        w.symlink("bin/sh", "busybox").expect("symlink");
        w.dir("/proc", 0o555).expect("proc");
        w.dir("bin", 0o755).expect("bin again is a no-op");
        w.file("a/b/c.txt", 0o644, b"abc").expect("nested");
        w.finish().expect("finish")
    }

    #[test]
    fn writes_newc_with_parents_modes_and_padding() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "init",
                "bin",
                "bin/busybox",
                "bin/sh",
                "proc",
                "a",
                "a/b",
                "a/b/c.txt"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.0 == n).expect("entry");
        assert_eq!(get("init").1, 0o100_755);
        assert_eq!(get("init").3, b"#!/bin/sh\necho hi\n");
        assert_eq!(get("bin").1, 0o040_755);
        assert_eq!(get("bin").2, 2);
        assert_eq!(get("bin/sh").1, 0o120_777);
        assert_eq!(get("bin/sh").3, b"busybox");
        assert_eq!(get("proc").1, 0o040_555);
        assert_eq!(get("a/b/c.txt").3, b"abc");
    }

    #[test]
    fn refuses_bad_and_duplicate_paths() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/", "a/../b", "./a", "a//b", "a\0b"] {
            assert!(
                matches!(w.file(bad, 0o644, b""), Err(CpioError::BadPath(_))),
                "{bad:?}"
            );
        }
        w.file("x", 0o644, b"").expect("x");
        assert!(matches!(
            w.file("/x", 0o644, b""),
            Err(CpioError::Duplicate(_))
        ));
    }

    #[test]
    fn is_deterministic() {
        assert_eq!(sample(), sample());
    }

    /// Cross-checks with busybox's cpio (from busybox-static, which the
    /// nested tests need anyway and `.ci/install-deps` installs).
    #[test]
    fn busybox_cpio_lists_it() {
        let busybox = std::path::Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox is missing: apt-get install busybox-static"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, sample()).expect("write");
        let out = Command::new(busybox)
            .args(["cpio", "-t", "-F"])
            .arg(&archive)
            .stderr(Stdio::piped())
            .output()
            .expect("run busybox cpio");
        assert!(out.status.success(), "{out:?}");
        let listed = String::from_utf8_lossy(&out.stdout);
        let listed: Vec<&str> = listed.lines().collect();
        assert_eq!(
            listed,
            [
                "init",
                "bin",
                "bin/busybox",
                "bin/sh",
                "proc",
                "a",
                "a/b",
                "a/b/c.txt"
            ]
        );
        // And extracts it with the right contents and link.
        let x = dir.path().join("x");
        std::fs::create_dir(&x).expect("mkdir");
        let status = Command::new(busybox)
            .args(["cpio", "-i", "-d", "-F"])
            .arg(&archive)
            .current_dir(&x)
            .stderr(Stdio::null())
            .status()
            .expect("extract");
        assert!(status.success());
        assert_eq!(std::fs::read(x.join("a/b/c.txt")).expect("read"), b"abc");
        assert_eq!(
            std::fs::read_link(x.join("bin/sh")).expect("readlink"),
            std::path::Path::new("busybox")
        );
    }
}
