//! How a VM ended: a process exit status per reason, and a JSON report line.

use serde::{Deserialize, Serialize};

/// Why a `reddog-vmm` process ended. Each reason has its own exit status so a
/// supervisor can tell them apart without parsing output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest powered off through ACPI (S5). Exit status 0.
    PowerOff,
    /// The guest asked for a reset (i8042 or the ACPI reset register). Status 10.
    Reset,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`). Status 11.
    TripleFault,
    /// KVM could not emulate something (`KVM_EXIT_INTERNAL_ERROR`). Status 12.
    InternalError,
    /// KVM could not enter the guest (`KVM_EXIT_FAIL_ENTRY`). Status 13.
    FailEntry,
    /// The guest caused an exit the VMM does not handle. Status 14.
    UnhandledExit,
    /// A vCPU thread panicked or `KVM_RUN` failed. Status 15.
    VcpuError,
    /// The configured wall-clock limit passed. Status 16.
    Timeout,
    /// The host agent asked for it (`shutdown` with mode `force` on the control
    /// socket, see [`crate::control`]). Status 17.
    Requested,
}

impl ExitReason {
    /// The process exit status for this reason. 1 stays for set-up errors
    /// (bad config, missing kernel, no KVM) and 2 for usage errors.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::PowerOff => 0,
            Self::Reset => 10,
            Self::TripleFault => 11,
            Self::InternalError => 12,
            Self::FailEntry => 13,
            Self::UnhandledExit => 14,
            Self::VcpuError => 15,
            Self::Timeout => 16,
            Self::Requested => 17,
        }
    }

    /// The reason an exit status stands for, if any.
    pub fn from_exit_code(code: i32) -> Option<Self> {
        [
            Self::PowerOff,
            Self::Reset,
            Self::TripleFault,
            Self::InternalError,
            Self::FailEntry,
            Self::UnhandledExit,
            Self::VcpuError,
            Self::Timeout,
            Self::Requested,
        ]
        .into_iter()
        .find(|r| r.exit_code() == code)
    }
}

/// The vCPU that stopped the VM, for failure reports: its general-purpose and
/// control registers, what `KVM_GET_VCPU_EVENTS` said and its last exits.
///
/// On AMD (SVM) KVM resets the vCPU (INIT) before it returns
/// `KVM_EXIT_SHUTDOWN`, so after a triple fault the registers and events show
/// the reset state (`rip=0xfff0`, `cs=0xf000`, nothing pending) and only
/// [`last_exits`](Self::last_exits) tells what the guest did before; on Intel
/// (VMX) they show the state at the fault. See `docs/testing.md`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct VcpuRegs {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: u16,
    /// `KVM_GET_VCPU_EVENTS` at the stop (`None` if the ioctl failed).
    #[serde(default)]
    pub events: Option<VcpuEvents>,
    /// The vCPU's last exits before the stop, oldest first (at most
    /// [`RECENT_EXITS`]; the stopping exit itself is in the report's detail).
    #[serde(default)]
    pub last_exits: Vec<RecentExit>,
    /// How many exits that vCPU had handled in all.
    #[serde(default)]
    pub exits_total: u64,
}

/// How many recent exits a failure report keeps per vCPU.
pub const RECENT_EXITS: usize = 8;

/// Pending and injected events of a vCPU, as `KVM_GET_VCPU_EVENTS` gives them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuEvents {
    /// An exception is being injected.
    pub exception_injected: bool,
    /// An exception is pending (not yet injected).
    pub exception_pending: bool,
    /// Its vector (meaningful when injected or pending).
    pub exception_vector: u8,
    /// Its error code, when it has one.
    pub exception_error_code: Option<u32>,
    /// An external interrupt is being injected.
    pub interrupt_injected: bool,
    /// Its vector.
    pub interrupt_vector: u8,
    /// The interrupt shadow (STI / MOV SS blocking).
    pub interrupt_shadow: u8,
    /// An NMI is being injected.
    pub nmi_injected: bool,
    /// An NMI is pending.
    pub nmi_pending: bool,
    /// NMIs are masked (an NMI handler runs).
    pub nmi_masked: bool,
    /// KVM's triple-fault flag, only when KVM reports it
    /// (`KVM_VCPUEVENT_VALID_TRIPLE_FAULT`, with `KVM_CAP_X86_TRIPLE_FAULT_EVENT`
    /// enabled); `None` otherwise.
    pub triple_fault_pending: Option<bool>,
    /// KVM's `flags` word (which optional fields are valid).
    pub flags: u32,
}

/// What kind of exit a vCPU handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecentExitKind {
    /// Port read (`addr` is the port).
    IoIn,
    /// Port write (`addr` is the port).
    IoOut,
    /// MMIO read (`addr` is the guest physical address).
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// `hlt`.
    Hlt,
    /// `KVM_RUN` returned `EINTR` or `EAGAIN` (a kick).
    Interrupted,
    /// Anything else.
    Other,
}

/// One exit of a vCPU's recent-exit ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentExit {
    /// What it was.
    pub kind: RecentExitKind,
    /// The port or guest physical address (0 where neither applies).
    pub addr: u64,
    /// Access size in bytes (0 where none).
    pub len: u8,
    /// The exit's number on its vCPU (0 = the first; no clock is read on
    /// the hot path).
    pub seq: u64,
}

/// The JSON line the VMM writes when it stops (to stderr, or to the file given
/// with `--exit-report`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    /// Why the VM stopped.
    pub reason: ExitReason,
    /// The process exit status that goes with it.
    pub exit_code: i32,
    /// Human-readable detail (the KVM exit, the port, the error).
    pub detail: String,
    /// Microseconds from the VMM's `main` to the guest's boot-timer write, if it came.
    pub boot_time_us: Option<u64>,
    /// Microseconds from the VMM's `main` to the first `KVM_RUN`.
    pub first_run_us: Option<u64>,
    /// Microseconds from the VMM's `main` to the stop.
    pub total_us: u64,
    /// The vCPU that stopped the VM, when one did.
    pub vcpu: Option<u8>,
    /// That vCPU's registers, for failures.
    pub regs: Option<VcpuRegs>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_invertible() {
        let all = [
            ExitReason::PowerOff,
            ExitReason::Reset,
            ExitReason::TripleFault,
            ExitReason::InternalError,
            ExitReason::FailEntry,
            ExitReason::UnhandledExit,
            ExitReason::VcpuError,
            ExitReason::Timeout,
            ExitReason::Requested,
        ];
        let mut codes: Vec<i32> = all.iter().map(|r| r.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        for r in all {
            assert_eq!(ExitReason::from_exit_code(r.exit_code()), Some(r));
            assert!(![1, 2].contains(&r.exit_code()));
        }
        assert_eq!(ExitReason::from_exit_code(1), None);
        assert_eq!(ExitReason::Requested.exit_code(), 17);
    }

    #[test]
    fn older_reports_without_events_still_parse() {
        let old = r#"{"rip":65520,"rsp":0,"rflags":2,"rax":0,"rbx":0,"rcx":0,"rdx":0,"rsi":0,"rdi":0,"rbp":0,"cr0":0,"cr3":0,"cr4":0,"efer":0,"cs":61440}"#;
        let r: VcpuRegs = serde_json::from_str(old).expect("old registers");
        assert_eq!(r.rip, 0xfff0);
        assert_eq!(r.events, None);
        assert!(r.last_exits.is_empty());
        let mut new = r.clone();
        new.last_exits.push(RecentExit {
            kind: RecentExitKind::IoOut,
            addr: 0x3f8,
            len: 1,
            seq: 5,
        });
        let text = serde_json::to_string(&new).expect("serialise");
        assert!(text.contains(r#""kind":"io_out""#), "{text}");
        assert_eq!(serde_json::from_str::<VcpuRegs>(&text).expect("parse"), new);
    }
}
