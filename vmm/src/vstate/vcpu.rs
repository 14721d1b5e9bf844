//! vCPUs: configuration for the chosen entry protocol, and the run loop that
//! dispatches KVM exits to the port-I/O bus and reports why the VM stopped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_api::{ExitReason, RecentExit, RecentExitKind, VcpuEvents, VcpuRegs, RECENT_EXITS};

use crate::arch::{cpuid, regs, regs::EntryMode, regs::RegsError};
use crate::control::metrics::ExitKind;
use crate::control::RunControl;
use crate::devices::{Bus, BusAction};

use super::vm::{Vm, VmError};

/// The MSR the host must know for a guest to see IA32_ARCH_CAPABILITIES.
const MSR_IA32_ARCH_CAPABILITIES: u32 = 0x10a;

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` failed.
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        /// Which vCPU.
        index: u8,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_CPUID2` failed.
    #[error("KVM refused the CPUID of vCPU {index}: {source}")]
    Cpuid {
        /// Which vCPU.
        index: u8,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Register set-up failed.
    #[error("vCPU {index}: {source}")]
    Regs {
        /// Which vCPU.
        index: u8,
        /// What failed.
        source: RegsError,
    },
    /// VM-level failure while creating vCPUs.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// Why a vCPU stopped the VM.
#[derive(Debug, Clone)]
pub struct StopEvent {
    /// The reason.
    pub reason: ExitReason,
    /// Detail for the report.
    pub detail: String,
    /// Which vCPU.
    pub vcpu: u8,
    /// Its registers, for failures.
    pub regs: Option<VcpuRegs>,
}

/// One vCPU.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`.
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self { index, fd })
    }

    /// Sets CPUID, MSRs and LAPIC pins; on the boot vCPU (`entry` given) also the
    /// registers for the entry protocol. Application processors wait for INIT/SIPI.
    pub fn configure(
        &self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        count: u8,
        entry: Option<(EntryMode, u64)>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let arch_caps = vm.msr_list.contains(&MSR_IA32_ARCH_CAPABILITIES);
        let cpuid = cpuid::for_vcpu(&vm.supported_cpuid, index, count, arch_caps);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::Cpuid { index, source })?;
        let regs_err = |source| VcpuError::Regs { index, source };
        let skipped = regs::setup_msrs(&self.fd, &vm.msr_list).map_err(regs_err)?;
        if !skipped.is_empty() && index == 0 {
            tracing::debug!(
                ?skipped,
                "host KVM does not take these boot MSRs; left at KVM's defaults"
            );
        }
        regs::setup_lint(&self.fd).map_err(regs_err)?;
        if let Some((mode, rip)) = entry {
            regs::setup_sregs(mem, &self.fd, mode).map_err(regs_err)?;
            regs::setup_regs(&self.fd, mode, rip).map_err(regs_err)?;
            regs::setup_fpu(&self.fd).map_err(regs_err)?;
        }
        Ok(())
    }

    /// Runs the vCPU until it stops the VM; sends the [`StopEvent`] to `stop`.
    /// `first_run_us` gets the time of the boot vCPU's first `KVM_RUN`. Before
    /// each `KVM_RUN` the vCPU parks if `ctl`'s gate says the VM is paused; each
    /// exit is counted in `ctl`'s counters.
    pub fn run(
        mut self,
        bus: Arc<Bus>,
        stop: Sender<StopEvent>,
        start: Instant,
        first_run_us: Arc<AtomicU64>,
        ctl: Arc<RunControl>,
    ) {
        // A VM built with `boot_on_request` holds here until `boot`, so the
        // first run is timed from then.
        ctl.gate.check(self.index);
        if self.index == 0 {
            first_run_us.store(start.elapsed().as_micros() as u64 + 1, Ordering::SeqCst);
        }
        let event = self.run_until_stop(&bus, &ctl);
        ctl.gate.exited(self.index);
        // The receiver may be gone if another vCPU stopped the VM first.
        let _ = stop.send(event);
    }

    fn run_until_stop(&mut self, bus: &Bus, ctl: &RunControl) -> StopEvent {
        let mut unknown_mmio_logged = 0u32;
        let counters = ctl.counters.vcpu(self.index);
        let mut ring = ExitRing::default();
        loop {
            ctl.gate.check(self.index);
            let mut kind = ExitKind::Other;
            // The port or address and size of this exit, for the ring.
            let mut at = (0u64, 0usize);
            let outcome: Option<(ExitReason, String, bool)> = match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => {
                        kind = ExitKind::IoOut;
                        at = (u64::from(port), data.len());
                        match bus.pio_write(port, data) {
                            BusAction::Continue => None,
                            BusAction::Stop(reason, detail) => Some((reason, detail, false)),
                        }
                    }
                    VcpuExit::IoIn(port, data) => {
                        kind = ExitKind::IoIn;
                        at = (u64::from(port), data.len());
                        bus.pio_read(port, data);
                        None
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        kind = ExitKind::MmioRead;
                        at = (addr, data.len());
                        if !bus.mmio_read(addr, data) {
                            data.fill(0xff);
                            log_unknown_mmio(&mut unknown_mmio_logged, addr, "read");
                        }
                        None
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        kind = ExitKind::MmioWrite;
                        at = (addr, data.len());
                        if !bus.mmio_write(addr, data) {
                            log_unknown_mmio(&mut unknown_mmio_logged, addr, "write");
                        }
                        None
                    }
                    VcpuExit::Hlt => {
                        kind = ExitKind::Hlt;
                        None
                    }
                    VcpuExit::Shutdown => Some((
                        ExitReason::TripleFault,
                        "KVM_EXIT_SHUTDOWN: the guest triple-faulted".into(),
                        true,
                    )),
                    VcpuExit::InternalError => Some((
                        ExitReason::InternalError,
                        "KVM_EXIT_INTERNAL_ERROR: KVM could not emulate an instruction".into(),
                        true,
                    )),
                    VcpuExit::FailEntry(reason, cpu) => Some((
                        ExitReason::FailEntry,
                        format!("KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host cpu {cpu}"),
                        true,
                    )),
                    VcpuExit::SystemEvent(kind, _) => match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                            Some((ExitReason::PowerOff, "KVM system event: shutdown".into(), false))
                        }
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                            Some((ExitReason::Reset, "KVM system event: reset".into(), false))
                        }
                        other => Some((
                            ExitReason::UnhandledExit,
                            format!("KVM system event {other}"),
                            true,
                        )),
                    },
                    other => Some((
                        ExitReason::UnhandledExit,
                        format!("unhandled KVM exit {other:?}"),
                        true,
                    )),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    kind = ExitKind::Interrupted;
                    None
                }
                Err(e) => Some((ExitReason::VcpuError, format!("KVM_RUN failed: {e}"), true)),
            };
            counters.count(kind);
            if let Some((reason, detail, with_regs)) = outcome {
                return StopEvent {
                    reason,
                    detail,
                    vcpu: self.index,
                    regs: with_regs.then(|| self.failure_state(&ring)),
                };
            }
            ring.push(kind, at.0, at.1);
        }
    }
}

impl Vcpu {
    /// Registers, KVM's events and the last exits, for a failure report.
    fn failure_state(&self, ring: &ExitRing) -> VcpuRegs {
        let mut state = regs::dump(&self.fd);
        state.events = match self.fd.get_vcpu_events() {
            Ok(e) => Some(events_from(&e)),
            Err(e) => {
                tracing::debug!(error = %e, "KVM_GET_VCPU_EVENTS failed");
                None
            }
        };
        state.last_exits = ring.recent();
        state.exits_total = ring.total;
        // On AMD, KVM has already reset (INIT) the vCPU when it returns
        // KVM_EXIT_SHUTDOWN: registers and events are the reset state then,
        // and the last exits are what is left of the fault (docs/testing.md).
        tracing::warn!(
            vcpu = self.index,
            events = ?state.events,
            last_exits = ?state.last_exits,
            exits_total = ring.total,
            "vCPU state at the stop"
        );
        state
    }
}

/// KVM's vCPU events in the report's terms.
fn events_from(e: &kvm_bindings::kvm_vcpu_events) -> VcpuEvents {
    VcpuEvents {
        exception_injected: e.exception.injected != 0,
        exception_pending: e.exception.pending != 0,
        exception_vector: e.exception.nr,
        exception_error_code: (e.exception.has_error_code != 0).then_some(e.exception.error_code),
        interrupt_injected: e.interrupt.injected != 0,
        interrupt_vector: e.interrupt.nr,
        interrupt_shadow: e.interrupt.shadow,
        nmi_injected: e.nmi.injected != 0,
        nmi_pending: e.nmi.pending != 0,
        nmi_masked: e.nmi.masked != 0,
        triple_fault_pending: (e.flags & kvm_bindings::KVM_VCPUEVENT_VALID_TRIPLE_FAULT != 0)
            .then_some(e.triple_fault.pending != 0),
        flags: e.flags,
    }
}

/// One entry of [`ExitRing`]: plain data, written in place on every exit.
#[derive(Debug, Clone, Copy)]
struct RingEntry {
    kind: ExitKind,
    addr: u64,
    len: u8,
}

impl Default for RingEntry {
    fn default() -> Self {
        Self {
            kind: ExitKind::Other,
            addr: 0,
            len: 0,
        }
    }
}

/// The last [`RECENT_EXITS`] exits of one vCPU, kept by its own thread for the
/// failure report: a fixed array written in place (no allocation, no lock, no
/// atomic) on the hot path; read only when the vCPU stops the VM.
#[derive(Debug, Default)]
struct ExitRing {
    entries: [RingEntry; RECENT_EXITS],
    /// Exits recorded so far; the next one goes to `total % RECENT_EXITS`.
    total: u64,
}

impl ExitRing {
    #[inline]
    fn push(&mut self, kind: ExitKind, addr: u64, len: usize) {
        let slot = (self.total % RECENT_EXITS as u64) as usize;
        self.entries[slot] = RingEntry {
            kind,
            addr,
            len: len.min(usize::from(u8::MAX)) as u8,
        };
        self.total += 1;
    }

    /// The kept exits, oldest first.
    fn recent(&self) -> Vec<RecentExit> {
        let kept = self.total.min(RECENT_EXITS as u64) as usize;
        let first = self.total as usize - kept;
        (first..first + kept)
            .map(|i| {
                let e = self.entries[i % RECENT_EXITS];
                RecentExit {
                    kind: match e.kind {
                        ExitKind::IoIn => RecentExitKind::IoIn,
                        ExitKind::IoOut => RecentExitKind::IoOut,
                        ExitKind::MmioRead => RecentExitKind::MmioRead,
                        ExitKind::MmioWrite => RecentExitKind::MmioWrite,
                        ExitKind::Hlt => RecentExitKind::Hlt,
                        ExitKind::Interrupted => RecentExitKind::Interrupted,
                        ExitKind::Other => RecentExitKind::Other,
                    },
                    addr: e.addr,
                    len: e.len,
                    seq: i as u64,
                }
            })
            .collect()
    }
}

/// Logs the first few accesses to unmapped MMIO, then stays quiet: a guest
/// must not be able to flood the host's log.
fn log_unknown_mmio(count: &mut u32, addr: u64, what: &str) {
    const LIMIT: u32 = 10;
    if *count < LIMIT {
        *count += 1;
        tracing::debug!(
            addr = format_args!("{addr:#x}"),
            "guest {what} of unmapped MMIO"
        );
        if *count == LIMIT {
            tracing::debug!("further unmapped MMIO accesses from this vCPU are not logged");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_exits_oldest_first() {
        let mut ring = ExitRing::default();
        assert!(ring.recent().is_empty());
        ring.push(ExitKind::IoOut, 0x3f8, 1);
        ring.push(ExitKind::MmioRead, 0xd000_0000, 4);
        let r = ring.recent();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].kind, RecentExitKind::IoOut);
        assert_eq!((r[0].addr, r[0].len), (0x3f8, 1));
        assert_eq!(r[1].kind, RecentExitKind::MmioRead);
        assert_eq!((r[1].addr, r[1].len), (0xd000_0000, 4));
        // Past the ring's size only the last RECENT_EXITS remain, in order.
        let n = RECENT_EXITS as u64 * 3 + 5;
        let mut ring = ExitRing::default();
        for port in 0..n {
            ring.push(ExitKind::IoIn, port, 2);
        }
        let r = ring.recent();
        assert_eq!(r.len(), RECENT_EXITS);
        let ports: Vec<u64> = r.iter().map(|e| e.addr).collect();
        let want: Vec<u64> = (n - RECENT_EXITS as u64..n).collect();
        assert_eq!(ports, want);
        let seqs: Vec<u64> = r.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, want);
        assert_eq!(ring.total, n);
        // A huge access size saturates instead of wrapping.
        ring.push(ExitKind::MmioWrite, 1, 4096);
        assert_eq!(ring.recent().last().map(|e| e.len), Some(u8::MAX));
    }

    #[test]
    fn kvm_events_are_translated() {
        let mut e = kvm_bindings::kvm_vcpu_events::default();
        e.exception.injected = 1;
        e.exception.nr = 14;
        e.exception.has_error_code = 1;
        e.exception.error_code = 2;
        e.nmi.masked = 1;
        let v = events_from(&e);
        assert!(v.exception_injected && !v.exception_pending);
        assert_eq!(v.exception_vector, 14);
        assert_eq!(v.exception_error_code, Some(2));
        assert!(v.nmi_masked && !v.nmi_pending);
        assert_eq!(v.triple_fault_pending, None);
        e.flags = kvm_bindings::KVM_VCPUEVENT_VALID_TRIPLE_FAULT;
        e.triple_fault.pending = 1;
        e.exception.has_error_code = 0;
        let v = events_from(&e);
        assert_eq!(v.triple_fault_pending, Some(true));
        assert_eq!(v.exception_error_code, None);
    }
}
