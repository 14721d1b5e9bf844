//! COM1: a 16550A UART from `vm-superio`, interrupting through an irqfd, writing
//! to stdout, a file, or nowhere.

use std::io::{self, Write};

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
