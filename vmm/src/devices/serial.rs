//! COM1: a 16550A UART from `vm-superio`, interrupting through an irqfd, writing
//! to stdout, a file (capped: [`RotatingFile`]), or nowhere.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The serial interrupt line: an eventfd registered with KVM as an irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Console output, line buffered. The UART flushes after every byte; passing
/// that through would cost a system call per byte of guest output, so output
/// goes out at each newline (or every 4 KiB), and on [`ConsoleWriter::flush_all`]
/// when the VM stops.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
}

impl ConsoleWriter {
    const LIMIT: usize = 4096;

    /// Buffers output for `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            buf: Vec::with_capacity(Self::LIMIT),
        }
    }

    /// Writes out everything buffered.
    pub fn flush_all(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let r = self.out.write_all(&self.buf);
            self.buf.clear();
            r?;
        }
        self.out.flush()
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= Self::LIMIT || data.contains(&b'\n') {
            self.flush_all()?;
        }
        Ok(data.len())
    }

    /// The UART's per-byte flush: ignored (see the type's docs).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A console file that never grows past `max` bytes: when a write would take
/// it past, the file is renamed to `<path>.1` (replacing an older one) and a
/// new one started. The guest's console thus takes at most `2 * max` bytes on
/// disk, and the most recent output is kept. A file left by an earlier run
/// counts toward the cap (it is appended to).
pub struct RotatingFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max: u64,
}

impl RotatingFile {
    /// Opens (appends to) `path`, capped at `max` bytes (at least 1).
    pub fn open(path: &Path, max: u64) -> io::Result<Self> {
        let file = Self::open_file(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file: Some(file),
            size,
            max: max.max(1),
        })
    }

    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new().create(true).append(true).open(path)
    }

    /// The rotated file's name: `<path>.1`.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".1");
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        std::fs::rename(&self.path, Self::rotated_path(&self.path))?;
        self.file = Some(Self::open_file(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // Longer than a whole file: keep its end.
        let keep = usize::try_from(self.max).unwrap_or(usize::MAX);
        let chunk = &data[data.len().saturating_sub(keep)..];
        if self.size.saturating_add(chunk.len() as u64) > self.max && self.size > 0 {
            if let Err(e) = self.rotate() {
                // Without a file nothing more is written: still bounded.
                tracing::warn!(
                    "serial console {}: cannot rotate: {e}; console output is dropped from now on",
                    self.path.display()
                );
            }
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(chunk)?;
            self.size += chunk.len() as u64;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), Write::flush)
    }
}

/// COM1 with its output sink.
pub struct SerialDevice {
    uart: Serial<IrqFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(IrqFdTrigger(irq), ConsoleWriter::new(out)),
        }
    }

    /// A register read.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A register write. Output errors (a closed stdout) are dropped: the guest
    /// must not be able to stop the VMM through its console.
    pub fn write(&mut self, offset: u8, value: u8) {
        let _ = self.uart.write(offset, value);
    }

    /// Writes out buffered output (a partial last line included).
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_console_file_rotates_at_its_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serial.log");
        std::fs::write(&path, b"from an earlier run\n").expect("old");
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let file = RotatingFile::open(&path, 4096).expect("open");
        let mut s = SerialDevice::new(evt, Box::new(file));
        // A guest printing 1 MiB of 64-byte lines.
        let line = [b"x".repeat(63), b"\n".to_vec()].concat();
        for _ in 0..(1 << 20) / 64 {
            for b in &line {
                s.write(0, *b);
            }
        }
        s.write(0, b'E');
        s.write(0, b'\n');
        s.flush();
        let cur = std::fs::read(&path).expect("current");
        let old = std::fs::read(RotatingFile::rotated_path(&path)).expect("rotated");
        assert!(
            cur.len() <= 4096 && old.len() <= 4096,
            "{} {}",
            cur.len(),
            old.len()
        );
        assert!(cur.ends_with(b"E\n"), "the newest output is kept");
        assert!(
            old.len() > 4096 - 64,
            "the rotated file is full: {}",
            old.len()
        );
        let files = std::fs::read_dir(dir.path()).expect("dir").count();
        assert_eq!(files, 2, "one current file and one rotated");
        // A single write longer than the cap keeps its end.
        let mut f = RotatingFile::open(&dir.path().join("big"), 10).expect("open");
        f.write_all(b"0123456789abcdef").expect("write");
        assert_eq!(
            std::fs::read(dir.path().join("big")).expect("read"),
            b"6789abcdef"
        );
    }

    #[test]
    fn bytes_reach_the_sink() {
        let sink = Sink::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut s = SerialDevice::new(evt, Box::new(sink.clone()));
        for b in b"hi\nthere" {
            s.write(0, *b);
        }
        // Whole lines go out at once; the partial line waits for the flush.
        assert_eq!(&*sink.0.lock().expect("lock"), b"hi\n");
        s.flush();
        assert_eq!(&*sink.0.lock().expect("lock"), b"hi\nthere");
        // Line status: transmitter empty.
        assert_ne!(s.read(5) & 0x20, 0);
    }
}
