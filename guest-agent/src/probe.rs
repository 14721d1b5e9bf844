//! The platform checks `reddog-guest` runs at boot. Each prints one line that
//! starts with `reddog-guest: `, which the nested tests parse.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::sys;

/// Prints one report line on the console.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "reddog-guest: {line}");
    let _ = out.flush();
}

/// Mounts devtmpfs, proc and sysfs (creating the mount points).
pub fn mount_kernel_filesystems() {
    for (src, dir, fs) in [
        ("devtmpfs", "/dev", "devtmpfs"),
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
    ] {
        let _ = fs::create_dir_all(dir);
        if let Err(e) = sys::mount(src, dir, fs, 0, "") {
            say(&format!("mount {dir} failed: {e}"));
        }
    }
}

/// Writes the boot timer's magic byte to its I/O port.
pub fn mark_boot_timer() {
    match sys::outb(
        vmm_platform::BOOT_TIMER_PORT,
        vmm_platform::BOOT_TIMER_MAGIC,
    ) {
        Ok(()) => say("boot-timer written"),
        Err(e) => say(&format!("boot-timer failed: {e}")),
    }
}

/// The platform constants the guest needs (mirrors `vmm_api::platform`, which
/// the untrusted guest does not link).
pub mod vmm_platform {
    /// Boot timer I/O port.
    pub const BOOT_TIMER_PORT: u16 = 0x440;
    /// Boot timer magic byte.
    pub const BOOT_TIMER_MAGIC: u8 = 123;
}

/// Loads the modules listed (one path per line, in dependency order) in `list`.
pub fn load_modules(list: &Path) {
    let Ok(text) = fs::read_to_string(list) else {
        say(&format!("no module list at {}", list.display()));
        return;
    };
    for path in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = Path::new(path)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(path);
        match sys::load_module(Path::new(path)) {
            Ok(()) => say(&format!("module {name} ok")),
            Err(e) => say(&format!("module {name} failed: {e}")),
        }
    }
}

/// One virtio disk as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `vda`, `vdb`, ...
    pub name: String,
    /// `/sys/block/<name>/serial`.
    pub serial: String,
    /// Size in 512-byte sectors.
    pub sectors: u64,
}

/// Waits (up to `wait`) for `want` virtio disks, then lists them.
pub fn find_disks(want: usize, wait: Duration) -> Vec<Disk> {
    let deadline = Instant::now() + wait;
    loop {
        let disks = list_disks(Path::new("/sys/block"));
        if disks.len() >= want || Instant::now() >= deadline {
            return disks;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lists `vd*` block devices under `sys_block`, sorted by name.
pub fn list_disks(sys_block: &Path) -> Vec<Disk> {
    let Ok(entries) = fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut disks: Vec<Disk> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            if !name.starts_with("vd") {
                return None;
            }
            let read = |f: &str| {
                fs::read_to_string(e.path().join(f))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            };
            Some(Disk {
                serial: read("serial"),
                sectors: read("size").parse().unwrap_or(0),
                name,
            })
        })
        .collect();
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    disks
}

/// The first `n` bytes of a disk as printable text (others as '.').
pub fn first_bytes(dev: &Path, n: usize) -> Result<String, std::io::Error> {
    let mut buf = vec![0u8; n];
    File::open(dev)?.read_exact(&mut buf)?;
    Ok(buf
        .iter()
        .map(|b| {
            if b.is_ascii_graphic() || *b == b' ' {
                *b as char
            } else {
                '.'
            }
        })
        .collect())
}

/// Tries to write the first sector of a disk (opening it for writing and
/// writing back what is there); reports whether the guest could.
pub fn try_write(dev: &Path) -> Result<(), std::io::Error> {
    let f = OpenOptions::new().read(true).write(true).open(dev)?;
    let mut sector = [0u8; 512];
    f.read_exact_at(&mut sector, 0)?;
    f.write_all_at(&sector, 0)?;
    f.sync_all()
}

/// Connects to the host over vsock and sends one line; returns the host's reply line.
pub fn vsock_hello(port: u32, timeout: Duration) -> Result<String, sys::SysError> {
    let mut conn = sys::vsock_connect(sys::VMADDR_CID_HOST, port, timeout)?;
    conn.write_all(b"hello from reddog-guest\n")
        .map_err(|source| sys::SysError::Call {
            call: "write(vsock)",
            source,
        })?;
    read_line(conn)
}

/// Accepts one host connection on `port`, reads a line, answers `pong`.
pub fn vsock_serve_one(port: u32, timeout: Duration) -> Result<String, sys::SysError> {
    let conn = sys::vsock_accept_one(port, timeout)?;
    let mut writer = conn.try_clone().map_err(|source| sys::SysError::Call {
        call: "dup",
        source,
    })?;
    let line = read_line(conn)?;
    writer
        .write_all(b"pong from reddog-guest\n")
        .map_err(|source| sys::SysError::Call {
            call: "write(vsock)",
            source,
        })?;
    Ok(line)
}

/// Reads one line of at most 1 KiB.
fn read_line(conn: File) -> Result<String, sys::SysError> {
    let mut line = String::new();
    BufReader::new(conn.take(1024))
        .read_line(&mut line)
        .map_err(|source| sys::SysError::Call {
            call: "read(vsock)",
            source,
        })?;
    Ok(line.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_virtio_disks_from_a_sysfs_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, serial, size) in [
            ("vdb", "reddog-res", "2048"),
            ("vda", "reddog-os", "4096"),
            ("sda", "x", "1"),
        ] {
            let d = dir.path().join(name);
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(d.join("serial"), format!("{serial}\n")).expect("serial");
            fs::write(d.join("size"), size).expect("size");
        }
        let disks = list_disks(dir.path());
        assert_eq!(
            disks,
            vec![
                Disk {
                    name: "vda".into(),
                    serial: "reddog-os".into(),
                    sectors: 4096
                },
                Disk {
                    name: "vdb".into(),
                    serial: "reddog-res".into(),
                    sectors: 2048
                },
            ]
        );
        assert!(list_disks(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn first_bytes_are_printable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("img");
        fs::write(&f, b"REDDOG\x00\x01disk").expect("write");
        assert_eq!(first_bytes(&f, 12).expect("read"), "REDDOG..disk");
        assert!(first_bytes(&f, 64).is_err(), "shorter than asked");
        let sector = dir.path().join("sector");
        fs::write(&sector, [7u8; 512]).expect("write");
        try_write(&sector).expect("writable file");
        assert_eq!(fs::read(&sector).expect("read"), vec![7u8; 512]);
    }
}
