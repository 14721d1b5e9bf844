//! The tiny test guest's kernel command line (`test-guest/README.md` lists
//! its options), built in one place so tests and benchmarks do not spell
//! options or virtio-mmio windows by hand.
//!
//! ```
//! use testkit::test_guest::{Cmdline, HbMode};
//! let c = Cmdline::new().quiet().exit_acpi().no_smp().vsock_for_disks(3).agent_port(1024);
//! assert_eq!(c.to_string(), "quiet exit=acpi smp=0 vsock=0xd0003000 agent_port=1024");
//! let c = Cmdline::new().vsock_for_disks(0).hb_mode(HbMode::Crash).crash_after(2);
//! assert_eq!(c.to_string(), "vsock=0xd0000000 hb_mode=crash crash_after=2");
//! ```
//!
//! Options come out in the order they were added.

use std::fmt;

use vmm_api::platform::mmio;

/// How the guest leaves once it has reported (`exit=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// ACPI S5 (the VMM reports `power_off`).
    Acpi,
    /// The ACPI reset register.
    AcpiReset,
    /// The i8042 reset line.
    I8042,
    /// QEMU's `isa-debug-exit` port.
    DebugExit,
    /// An empty IDT, then `ud2`.
    TripleFault,
    /// `cli; hlt` forever.
    Hang,
    /// A busy loop forever.
    Spin,
}

impl Exit {
    /// Every mode.
    pub const ALL: [Exit; 7] = [
        Exit::Acpi,
        Exit::AcpiReset,
        Exit::I8042,
        Exit::DebugExit,
        Exit::TripleFault,
        Exit::Hang,
        Exit::Spin,
    ];

    /// The option's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Exit::Acpi => "acpi",
            Exit::AcpiReset => "acpi-reset",
            Exit::I8042 => "i8042",
            Exit::DebugExit => "debug-exit",
            Exit::TripleFault => "triple-fault",
            Exit::Hang => "hang",
            Exit::Spin => "spin",
        }
    }
}

/// How the guest's vsock agent behaves (`hb_mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbMode {
    /// Hello, heartbeats, answers.
    Normal,
    /// Hello, then nothing.
    Silent,
    /// Normal, then a triple fault after `crash_after` heartbeats.
    Crash,
    /// Bytes that are not frames.
    Garbage,
    /// Heartbeats as fast as the rings allow.
    Flood,
}

impl HbMode {
    /// The option's value.
    pub fn as_str(self) -> &'static str {
        match self {
            HbMode::Normal => "normal",
            HbMode::Silent => "silent",
            HbMode::Crash => "crash",
            HbMode::Garbage => "garbage",
            HbMode::Flood => "flood",
        }
    }
}

/// A test guest command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    words: Vec<String>,
}

impl Cmdline {
    /// An empty command line (the guest's defaults: `exit=acpi`, APs started,
    /// no vsock agent).
    pub fn new() -> Self {
        Self::default()
    }

    /// `quiet`: only the hello line (and the boot timer), then leave.
    pub fn quiet(self) -> Self {
        self.word("quiet")
    }

    /// `exit=<mode>`.
    pub fn exit(self, mode: Exit) -> Self {
        self.opt("exit", mode.as_str())
    }

    /// `exit=acpi`.
    pub fn exit_acpi(self) -> Self {
        self.exit(Exit::Acpi)
    }

    /// `smp=0`: do not start the APs.
    pub fn no_smp(self) -> Self {
        self.opt("smp", 0)
    }

    /// `vsock=<addr>`: run the vsock agent on the virtio-mmio window at `addr`.
    pub fn vsock_at(self, addr: u64) -> Self {
        self.opt("vsock", format_args!("{addr:#x}"))
    }

    /// `vsock=` the window reddog-vmm gives the vsock device of a VM with
    /// `disks` disks (`vmm_api::platform::mmio::vsock_window`).
    ///
    /// # Panics
    /// When that many devices do not fit the layout: a bug in the test.
    #[track_caller]
    pub fn vsock_for_disks(self, disks: u32) -> Self {
        match mmio::vsock_window(disks) {
            Some(w) => self.vsock_at(w.addr),
            None => panic!(
                "{disks} disks leave no virtio-mmio window for vsock (at most {} devices)",
                mmio::MAX_DEVICES
            ),
        }
    }

    /// `net=<addr>`: echo every frame the virtio-net device at `addr`
    /// receives, source and destination MAC swapped.
    pub fn net_echo_at(self, addr: u64) -> Self {
        self.opt("net", format_args!("{addr:#x}"))
    }

    /// `net=` the window reddog-vmm gives virtio-net device `index` of a VM
    /// with `disks` disks and (when `vsock`) a vsock device
    /// (`vmm_api::platform::mmio::net_window`).
    ///
    /// # Panics
    /// When that many devices do not fit the layout: a bug in the test.
    #[track_caller]
    pub fn net_echo_for(self, disks: u32, vsock: bool, index: u32) -> Self {
        match mmio::net_window(disks, vsock, index) {
            Some(w) => self.net_echo_at(w.addr),
            None => panic!("no virtio-mmio window for net {index} after {disks} disks"),
        }
    }

    /// `net_oversize`: before echoing, the guest sends one frame one byte
    /// over the MTU (the VMM must drop and count it).
    pub fn net_oversize(self) -> Self {
        self.word("net_oversize")
    }

    /// `blk=<addr> blk_reads=<n> blk_kib=<k>`: instead of the vsock agent,
    /// time `n` reads of `k` KiB (at most 64) from the virtio-blk device on the
    /// window at `addr` (disk `i` is at `vmm_api::platform::mmio` window `i`);
    /// the guest prints `blk: reads=<n> kib=<k> ms=<elapsed>`.
    pub fn blk_reads(self, addr: u64, n: u32, kib: u32) -> Self {
        self.opt("blk", format_args!("{addr:#x}"))
            .opt("blk_reads", n)
            .opt("blk_kib", kib)
    }

    /// `agent_port=<port>`: the host port the agent connects to.
    pub fn agent_port(self, port: u32) -> Self {
        self.opt("agent_port", port)
    }

    /// `agent_port={vsock_port}`: for a host agent launcher's command line
    /// template, which puts the instance's guest port there.
    pub fn agent_port_template(self) -> Self {
        self.word("agent_port={vsock_port}")
    }

    /// `hb_ms=<ms>`: the heartbeat interval until the host sets one.
    pub fn hb_ms(self, ms: u32) -> Self {
        self.opt("hb_ms", ms)
    }

    /// `hb_mode=<mode>`.
    pub fn hb_mode(self, mode: HbMode) -> Self {
        self.opt("hb_mode", mode.as_str())
    }

    /// `crash_after=<n>`: heartbeats before [`HbMode::Crash`] crashes.
    pub fn crash_after(self, n: u32) -> Self {
        self.opt("crash_after", n)
    }

    /// `boot_id=<32 hex>`: the `Hello.boot_id`, byte 0 first.
    pub fn boot_id(self, id: [u8; 16]) -> Self {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        self.opt("boot_id", hex)
    }

    /// `agent_clock=tsc`: calibrate the TSC instead of using kvmclock.
    pub fn agent_clock_tsc(self) -> Self {
        self.opt("agent_clock", "tsc")
    }

    /// `key=value`, for options without a method (and for malformed values,
    /// in tests of the guest's option parsing).
    pub fn opt(mut self, key: &str, value: impl fmt::Display) -> Self {
        self.words.push(format!("{key}={value}"));
        self
    }

    /// A bare word (a marker the guest echoes, an option without a method).
    pub fn word(mut self, word: impl Into<String>) -> Self {
        self.words.push(word.into());
        self
    }

    /// Appends every word of `other`.
    pub fn extend(mut self, other: &Cmdline) -> Self {
        self.words.extend(other.words.iter().cloned());
        self
    }
}

impl fmt::Display for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.words.join(" "))
    }
}

impl From<Cmdline> for String {
    fn from(c: Cmdline) -> String {
        c.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_come_out_in_order() {
        let c = Cmdline::new()
            .quiet()
            .exit_acpi()
            .no_smp()
            .vsock_for_disks(3)
            .agent_port_template()
            .hb_mode(HbMode::Crash)
            .crash_after(2);
        assert_eq!(
            c.to_string(),
            "quiet exit=acpi smp=0 vsock=0xd0003000 agent_port={vsock_port} hb_mode=crash crash_after=2"
        );
        assert_eq!(Cmdline::new().to_string(), "");
    }

    #[test]
    fn every_option_is_spelled_as_the_guest_reads_it() {
        let c = Cmdline::new()
            .exit(Exit::TripleFault)
            .vsock_at(0xd000_1000)
            .agent_port(2048)
            .hb_ms(100)
            .hb_mode(HbMode::Flood)
            .boot_id([0xab; 16])
            .agent_clock_tsc()
            .net_echo_for(1, true, 0)
            .net_oversize()
            .opt("hb_mode", "nonsense")
            .word("from=config");
        assert_eq!(
            c.to_string(),
            format!(
                "exit=triple-fault vsock=0xd0001000 agent_port=2048 hb_ms=100 hb_mode=flood boot_id={} agent_clock=tsc net=0xd0002000 net_oversize hb_mode=nonsense from=config",
                "ab".repeat(16)
            )
        );
        let modes: Vec<&str> = Exit::ALL.iter().map(|m| m.as_str()).collect();
        assert_eq!(
            modes,
            [
                "acpi",
                "acpi-reset",
                "i8042",
                "debug-exit",
                "triple-fault",
                "hang",
                "spin"
            ]
        );
    }

    #[test]
    fn vsock_follows_the_disks() {
        assert_eq!(
            Cmdline::new().vsock_for_disks(0).to_string(),
            "vsock=0xd0000000"
        );
        assert_eq!(
            Cmdline::new().vsock_for_disks(1).to_string(),
            "vsock=0xd0001000"
        );
    }

    #[test]
    #[should_panic(expected = "no virtio-mmio window for vsock")]
    fn too_many_disks_is_a_test_bug() {
        let _ = Cmdline::new().vsock_for_disks(mmio::MAX_DEVICES);
    }
}
