//! Counters for the control socket's `metrics`: per-vCPU exit counts (each
//! written only by its own vCPU thread, on its own cache line) and VM-wide ones.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_api::control::ExitCounts;

/// What kind of KVM exit the run loop handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// `hlt`.
    Hlt,
    /// `KVM_RUN` returned `EINTR` (a pause kick).
    Interrupted,
    /// Anything else.
    Other,
}

/// One vCPU's exit counts. Only that vCPU's thread writes them, so a plain
/// load and store (no locked instruction) is enough; readers may see a count
/// that is one behind.
#[derive(Default)]
#[repr(align(64))]
pub struct VcpuCounters {
    counts: [AtomicU64; 7],
}

impl VcpuCounters {
    /// Counts one exit (called by the owning vCPU thread only).
    #[inline]
    pub fn count(&self, kind: ExitKind) {
        let c = &self.counts[kind as usize];
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> [u64; 7] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

/// Every counter of a VM.
pub struct Counters {
    vcpus: Box<[VcpuCounters]>,
    /// Bytes the serial console wrote out (see [`CountingWriter`]).
    pub serial_bytes_out: Arc<AtomicU64>,
    /// Completed pauses.
    pub pauses: AtomicU64,
    /// ACPI power-button presses.
    pub power_button_presses: AtomicU64,
    /// Each virtio-net device's counters, in the config's order (filled as
    /// the devices are built).
    pub net: std::sync::Mutex<Vec<Arc<crate::devices::virtio::net::NetCounters>>>,
}

impl Counters {
    /// Counters for `vcpus` vCPUs, all zero.
    pub fn new(vcpus: u8) -> Self {
        Self {
            vcpus: (0..vcpus).map(|_| VcpuCounters::default()).collect(),
            serial_bytes_out: Arc::default(),
            pauses: AtomicU64::new(0),
            power_button_presses: AtomicU64::new(0),
            net: std::sync::Mutex::default(),
        }
    }

    /// vCPU `index`'s counters.
    pub fn vcpu(&self, index: u8) -> &VcpuCounters {
        &self.vcpus[usize::from(index)]
    }

    /// Exits summed over the vCPUs.
    pub fn exits(&self) -> ExitCounts {
        let mut sum = [0u64; 7];
        for v in self.vcpus.iter() {
            for (s, c) in sum.iter_mut().zip(v.snapshot()) {
                *s += c;
            }
        }
        let [io_in, io_out, mmio_read, mmio_write, hlt, interrupted, other] = sum;
        ExitCounts {
            io_in,
            io_out,
            mmio_read,
            mmio_write,
            hlt,
            interrupted,
            other,
        }
    }
}

impl Counters {
    /// Every virtio-net device's counters, in the config's order.
    pub fn net(&self) -> Vec<vmm_api::NetMetrics> {
        match self.net.lock() {
            Ok(n) => n.iter().map(|c| c.snapshot()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Counts the bytes that pass through to the console's output.
pub struct CountingWriter {
    inner: Box<dyn Write + Send>,
    count: Arc<AtomicU64>,
}

impl CountingWriter {
    /// Wraps `inner`, adding to `count`.
    pub fn new(inner: Box<dyn Write + Send>, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_sum_over_vcpus() {
        let c = Counters::new(2);
        c.vcpu(0).count(ExitKind::IoOut);
        c.vcpu(0).count(ExitKind::IoOut);
        c.vcpu(1).count(ExitKind::IoOut);
        c.vcpu(1).count(ExitKind::MmioRead);
        c.vcpu(1).count(ExitKind::Interrupted);
        let e = c.exits();
        assert_eq!((e.io_out, e.mmio_read, e.interrupted), (3, 1, 1));
        assert_eq!(e.total(), 5);
        assert_eq!(std::mem::align_of::<VcpuCounters>(), 64);
    }

    #[test]
    fn the_writer_counts_what_passes() {
        let count = Arc::new(AtomicU64::new(0));
        let mut w = CountingWriter::new(Box::new(io::sink()), count.clone());
        w.write_all(b"hello\n").expect("write");
        assert_eq!(count.load(Ordering::Relaxed), 6);
    }
}
