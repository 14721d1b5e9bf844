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

/// General-purpose and control registers of a vCPU, for failure reports.
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
}
