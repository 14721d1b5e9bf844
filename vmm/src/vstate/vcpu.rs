//! vCPUs: configuration for the chosen entry protocol, and the run loop that
//! dispatches KVM exits to the port-I/O bus and reports why the VM stopped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_api::{ExitReason, VcpuRegs};

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
        loop {
            ctl.gate.check(self.index);
            let mut kind = ExitKind::Other;
            let outcome: Option<(ExitReason, String, bool)> = match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => {
                        kind = ExitKind::IoOut;
                        match bus.pio_write(port, data) {
                            BusAction::Continue => None,
                            BusAction::Stop(reason, detail) => Some((reason, detail, false)),
                        }
                    }
                    VcpuExit::IoIn(port, data) => {
                        kind = ExitKind::IoIn;
                        bus.pio_read(port, data);
                        None
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        kind = ExitKind::MmioRead;
                        if !bus.mmio_read(addr, data) {
                            data.fill(0xff);
                            log_unknown_mmio(&mut unknown_mmio_logged, addr, "read");
                        }
                        None
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        kind = ExitKind::MmioWrite;
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
                    regs: with_regs.then(|| regs::dump(&self.fd)),
                };
            }
        }
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
