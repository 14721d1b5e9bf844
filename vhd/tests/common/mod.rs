//! Helpers shared by the integration tests. Tools the tests need (qemu-img, qemu-io,
//! vhdiinfo, python3 with pyvhdi) must be installed: a missing tool fails the test loudly.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs a tool and returns its output; panics with a clear message if it cannot start.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} ({e}); install it (see .ci/install-deps: qemu-utils, libvhdi-utils, python3-libvhdi)")
    })
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `qemu-img check`'s exit code (0 clean, 2 corrupt, 3 leaks).
pub fn qemu_check(path: &Path, fmt: &str) -> (i32, String) {
    let o = run("qemu-img", &["check", "-f", fmt, s(path)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

/// Asserts `qemu-img check` is clean.
pub fn assert_check_clean(path: &Path, fmt: &str) {
    let (code, text) = qemu_check(path, fmt);
    assert_eq!(code, 0, "qemu-img check {} failed:\n{text}", path.display());
}

/// Asserts the image reads (per qemu-img) the same as the raw file `expected`.
pub fn assert_compare(path: &Path, fmt: &str, expected: &Path) {
    let o = run(
        "qemu-img",
        &["compare", "-f", fmt, "-F", "raw", s(path), s(expected)],
    );
    assert!(
        o.status.success(),
        "qemu-img compare {} {} failed: {}{}",
        path.display(),
        expected.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs qemu-img with the arguments and asserts success.
pub fn qemu_img(args: &[&str]) {
    let o = run("qemu-img", args);
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs qemu-io with the arguments and asserts success.
pub fn qemu_io(args: &[&str]) {
    let o = run("qemu-io", args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && !out.contains("failed"),
        "qemu-io {args:?} failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce from the seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Reads a whole file.
pub fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("read file")
}

/// A stable hash of a file's bytes (FNV-1a 64).
pub fn hash_file(p: &Path) -> u64 {
    read_file(p).iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use vhd::DiskImage;

/// An image under test plus a raw file holding what it must read as.
pub struct Oracle {
    pub img: Option<Arc<dyn DiskImage>>,
    pub expected: File,
    pub size: u64,
    /// Requests are aligned to this (1 = any byte offset).
    pub align: u64,
    /// Offsets near which writes are attracted (cluster and L2 boundaries).
    pub hot: Vec<u64>,
    pub use_discard: bool,
    pub use_zeroes: bool,
}

impl Oracle {
    /// `expected` must already hold the initial content (e.g. the base's bytes).
    pub fn new(img: Arc<dyn DiskImage>, expected: &Path, align: u64) -> Self {
        let size = img.size();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(expected)
            .expect("open expected file");
        f.set_len(size).expect("size expected file");
        Oracle {
            img: Some(img),
            expected: f,
            size,
            align,
            hot: Vec::new(),
            use_discard: true,
            use_zeroes: true,
        }
    }

    pub fn img(&self) -> &Arc<dyn DiskImage> {
        self.img.as_ref().expect("image is open")
    }

    fn pick_range(&self, rng: &mut Rng, max_len: u64) -> (u64, u64) {
        let a = self.align;
        let len = ((1 + rng.below(max_len)) / a * a).max(a);
        let len = len.min(self.size);
        let off = if !self.hot.is_empty() && rng.below(2) == 0 {
            let h = self.hot[rng.below(self.hot.len() as u64) as usize];
            h.saturating_sub(rng.below(len + a)).min(self.size - len)
        } else {
            rng.below(self.size - len + 1)
        };
        (off / a * a, len)
    }

    /// Runs `n` random operations (no flush/reopen; the caller decides those).
    pub fn random_ops(&mut self, rng: &mut Rng, n: usize, max_len: u64) {
        for _ in 0..n {
            let (off, len) = self.pick_range(rng, max_len);
            let kind = rng.below(10);
            if kind < 7 || (!self.use_discard && !self.use_zeroes) {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                self.img().write_at(&buf, off).expect("write");
                self.expected
                    .write_all_at(&buf, off)
                    .expect("write expected");
            } else if kind < 9 && self.use_zeroes || !self.use_discard {
                self.img().write_zeroes(off, len).expect("write zeroes");
                self.expected
                    .write_all_at(&vec![0u8; len as usize], off)
                    .expect("zero expected");
            } else {
                self.img().discard(off, len).expect("discard");
                self.expected
                    .write_all_at(&vec![0u8; len as usize], off)
                    .expect("zero expected");
            }
            if rng.below(8) == 0 {
                self.img().flush().expect("flush");
            }
            // Read back a random range now and then.
            if rng.below(4) == 0 {
                let (off, len) = self.pick_range(rng, max_len);
                self.verify_range(off, len);
            }
        }
    }

    /// Checks our reader against the expected file on one range.
    pub fn verify_range(&self, off: u64, len: u64) {
        let mut a = vec![0u8; len as usize];
        let mut b = vec![0u8; len as usize];
        self.img().read_at(&mut a, off).expect("read");
        self.expected
            .read_exact_at(&mut b, off)
            .expect("read expected");
        if a != b {
            let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
            panic!(
                "image differs from expected at {:#x} (range {off:#x}+{len})",
                off + i as u64
            );
        }
    }

    /// Reads the whole image through our reader and compares.
    pub fn verify_all(&self) {
        let step = 1u64 << 20;
        let mut off = 0;
        while off < self.size {
            let len = step.min(self.size - off);
            self.verify_range(off, len);
            off += len;
        }
    }

    /// Flushes and closes the image (so external tools see a quiescent file).
    pub fn close(&mut self) {
        if let Some(img) = self.img.take() {
            img.flush().expect("flush before close");
        }
    }

    pub fn reopen(&mut self, img: Arc<dyn DiskImage>) {
        assert_eq!(img.size(), self.size, "size changed across reopen");
        self.img = Some(img);
    }
}
