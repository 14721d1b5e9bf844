//! [`VmConfig`]: everything one `reddog-vmm` process needs to build and boot a VM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::limits::RateLimit;

/// Smallest guest memory the VMM accepts (the ACPI tables, boot structures and a
/// kernel need room).
pub const MIN_MEMORY_MIB: u32 = 32;
/// Largest guest memory the VMM accepts.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// Largest number of vCPUs (the MADT and the APIC IDs are laid out for this many).
pub const MAX_VCPUS: u8 = 64;
/// Longest kernel command line, including the terminating NUL.
pub const MAX_CMDLINE_LEN: usize = 4096;

/// Errors in a [`VmConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON could not be parsed.
    #[error(
        "VM config is not valid JSON for VmConfig: {0}; see vmm-api/src/config.rs for the fields"
    )]
    Parse(#[from] serde_json::Error),
    /// The config file could not be read.
    #[error("cannot read VM config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `vcpus` out of range.
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    /// `memory_mib` out of range.
    #[error("memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, got {0}")]
    Memory(u32),
    /// The command line is too long or holds a NUL byte.
    #[error("cmdline must be under {MAX_CMDLINE_LEN} bytes with no NUL byte (got {0} bytes)")]
    Cmdline(usize),
    /// Too many disks, or a bad serial.
    #[error("disk {index}: {why}")]
    Disk {
        /// Which disk.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// A bad vsock setting.
    #[error("vsock: {0}")]
    Vsock(String),
    /// A timeout of zero.
    #[error("timeout_ms must be positive when set; leave it out for no limit")]
    Timeout,
    /// A bad control socket path.
    #[error("api_sock: {0}")]
    ApiSock(String),
    /// A bad network interface setting.
    #[error("net {index}: {why}")]
    Net {
        /// Which interface.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// An output cap out of bounds.
    #[error("{field} must be between {MIN_OUTPUT_CAP} and {MAX_OUTPUT_CAP} bytes, got {value}")]
    OutputCap {
        /// `serial_max_bytes` or `log_max_bytes`.
        field: &'static str,
        /// The value given.
        value: u64,
    },
}

/// Longest control socket path in bytes (`sun_path` holds 108 with the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "path")]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Appended to a file (created if missing).
    File(PathBuf),
    /// Dropped.
    Null,
}

/// Most disks one VM may have.
pub const MAX_DISKS: usize = 8;
/// Longest disk serial (virtio-blk's ID is 20 bytes).
pub const MAX_SERIAL_LEN: usize = 20;

/// A disk image's format. Always explicit: the VMM never guesses it from the
/// file's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    /// Plain bytes.
    Raw,
    /// qcow2 (v2 or v3).
    Qcow2,
    /// Microsoft VHD (fixed, dynamic or differencing).
    Vhd,
}

/// The backing (base) image of a differencing disk, named by the trusted side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackingConfig {
    /// The base image (opened read-only).
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// For a differencing image: its base. Never taken from inside the image.
    #[serde(default)]
    pub backing: Option<BackingConfig>,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
    /// The serial the guest reads (`/sys/block/vdX/serial`), at most 20 ASCII bytes.
    #[serde(default)]
    pub serial: String,
    /// Bytes and requests per second the guest may ask of this disk (no limit
    /// when left out).
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// Smallest guest CID (0-2 are reserved: hypervisor, local, host).
pub const MIN_GUEST_CID: u32 = 3;

/// A virtio-vsock device with Firecracker's hybrid convention: the host connects
/// to `uds_path` and writes `CONNECT <port>\n`; a guest connection to the host
/// (CID 2) port P goes to the unix socket `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u32,
    /// The unix socket the VMM listens on for host-initiated connections.
    pub uds_path: PathBuf,
}

/// Longest network interface name (`IFNAMSIZ` less the NUL).
pub const MAX_IFNAME_LEN: usize = 15;
/// Most network interfaces one VM may have.
pub const MAX_NETS: usize = 4;
/// Smallest MTU the VMM accepts (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU the VMM accepts.
pub const MAX_MTU: u16 = 9000;
/// The MTU when none is set.
pub const DEFAULT_MTU: u16 = 1500;

/// Where a virtio-net device's frames go: a TAP device on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TapConfig {
    /// Open the TAP interface with this name (`/dev/net/tun`, `TUNSETIFF`).
    Name(String),
    /// An already-open TAP file descriptor the VMM inherited (a jailed VMM
    /// is handed its TAP this way).
    Fd(i32),
}

/// One virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The host side.
    pub tap: TapConfig,
    /// The guest's MAC address, `02:xx:xx:xx:xx:xx` form (six hex pairs).
    pub mac: String,
    /// The MTU the guest is told (config space); frames over it plus the
    /// header are dropped. [`DEFAULT_MTU`] when left out.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Bytes and frames per second, each direction (no limit when left out).
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

impl NetConfig {
    /// The MTU in effect.
    pub fn mtu(&self) -> u16 {
        self.mtu.unwrap_or(DEFAULT_MTU)
    }

    /// The MAC address as bytes, if it is six `:`-separated hex pairs.
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootProtocol {
    /// PVH when the kernel is an ELF with a PVH note, the Linux 64-bit boot
    /// protocol for an ELF without it or for a bzImage.
    #[default]
    Auto,
    /// PVH (32-bit protected mode entry, `hvm_start_info`); the ELF must carry
    /// the PVH note.
    Pvh,
    /// Linux 64-bit boot protocol (long mode, `boot_params` in `rsi`).
    Linux64,
}

/// A VM: kernel, memory, vCPUs, console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: an ELF (vmlinux, with or without a PVH note) or a bzImage.
    pub kernel: PathBuf,
    /// How to enter the kernel.
    #[serde(default)]
    pub boot_protocol: BootProtocol,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Optional initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Number of vCPUs (1 to [`MAX_VCPUS`]).
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Serial console destination.
    #[serde(default)]
    pub serial: SerialOutput,
    /// virtio-blk disks, in the order the guest enumerates them.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Also describe each virtio-mmio device on the kernel command line
    /// (`virtio_mmio.device=4K@<base>:<irq>`), for kernels built with
    /// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` that do not read the DSDT. The DSDT
    /// describes them either way.
    #[serde(default)]
    pub virtio_mmio_cmdline: bool,
    /// An optional virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Wall-clock limit for the whole VM run, from process start; the VM is
    /// stopped with [`crate::ExitReason::Timeout`] when it passes.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The control socket (see [`crate::control`]): the VMM listens on this unix
    /// socket path for the agent's requests. A stale socket file is replaced; a
    /// path another live VMM listens on is refused.
    #[serde(default)]
    pub api_sock: Option<PathBuf>,
    /// Build the VM but hold its vCPUs until a `boot` request on the control
    /// socket (needs `api_sock`): a client can subscribe to the VM's events
    /// before the guest runs its first instruction.
    #[serde(default)]
    pub boot_on_request: bool,
    /// virtio-net devices, in the order the guest enumerates them.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Cap of a [`SerialOutput::File`]: when the file reaches this many bytes
    /// it is renamed to `<file>.1` (replacing an older one) and a new file
    /// started, so the guest's console never takes more than twice this on
    /// disk. [`MIN_OUTPUT_CAP`] to [`MAX_OUTPUT_CAP`]; default
    /// [`DEFAULT_SERIAL_MAX_BYTES`].
    #[serde(default = "default_serial_max_bytes")]
    pub serial_max_bytes: u64,
    /// Cap of the VMM's own log (stderr) over the whole run: past it one line
    /// says so and later lines are dropped (the exit report still gets out).
    /// [`MIN_OUTPUT_CAP`] to [`MAX_OUTPUT_CAP`]; default [`DEFAULT_LOG_MAX_BYTES`].
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
}

/// Default [`VmConfig::serial_max_bytes`]: 1 MiB.
pub const DEFAULT_SERIAL_MAX_BYTES: u64 = 1 << 20;
/// Default [`VmConfig::log_max_bytes`]: 1 MiB.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 1 << 20;
/// Smallest output cap (serial file, VMM log): 4 KiB.
pub const MIN_OUTPUT_CAP: u64 = 4096;
/// Largest output cap: 1 GiB.
pub const MAX_OUTPUT_CAP: u64 = 1 << 30;

fn default_serial_max_bytes() -> u64 {
    DEFAULT_SERIAL_MAX_BYTES
}

fn default_log_max_bytes() -> u64 {
    DEFAULT_LOG_MAX_BYTES
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u32 {
    128
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            boot_protocol: BootProtocol::Auto,
            cmdline: String::new(),
            initrd: None,
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            serial: SerialOutput::Stdout,
            disks: Vec::new(),
            virtio_mmio_cmdline: false,
            vsock: None,
            timeout_ms: None,
            api_sock: None,
            boot_on_request: false,
            net: Vec::new(),
            serial_max_bytes: DEFAULT_SERIAL_MAX_BYTES,
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
        }
    }

    /// Parses and validates a JSON config.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let cfg: Self = serde_json::from_str(json)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a JSON config file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let json = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&json)
    }

    /// Checks every bound. The VMM calls this before touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if self.cmdline.len() >= MAX_CMDLINE_LEN || self.cmdline.contains('\0') {
            return Err(ConfigError::Cmdline(self.cmdline.len()));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::Disk {
                index: MAX_DISKS,
                why: format!("at most {MAX_DISKS} disks"),
            });
        }
        for (index, d) in self.disks.iter().enumerate() {
            if d.serial.len() > MAX_SERIAL_LEN || !d.serial.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::Disk {
                    index,
                    why: format!(
                        "serial {:?} must be at most {MAX_SERIAL_LEN} printable ASCII bytes",
                        d.serial
                    ),
                });
            }
            if let Some(r) = &d.rate_limit {
                r.validate().map_err(|why| ConfigError::Disk {
                    index,
                    why: format!("rate_limit: {why}"),
                })?;
            }
        }
        if self.net.len() > MAX_NETS {
            return Err(ConfigError::Net {
                index: MAX_NETS,
                why: format!("at most {MAX_NETS} interfaces"),
            });
        }
        for (index, n) in self.net.iter().enumerate() {
            let bad = |why: String| ConfigError::Net { index, why };
            match &n.tap {
                TapConfig::Name(name) => {
                    if name.is_empty()
                        || name.len() > MAX_IFNAME_LEN
                        || !name.bytes().all(|b| {
                            b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
                        })
                    {
                        return Err(bad(format!(
                            "tap name {name:?} must be 1 to {MAX_IFNAME_LEN} bytes of [A-Za-z0-9._-]"
                        )));
                    }
                }
                TapConfig::Fd(fd) => {
                    if *fd < 3 {
                        return Err(bad(format!(
                            "tap fd {fd} must be an inherited descriptor (3 or more)"
                        )));
                    }
                }
            }
            match n.mac_bytes() {
                None => {
                    return Err(bad(format!(
                        "mac {:?} must be six hex pairs separated by ':'",
                        n.mac
                    )))
                }
                Some(m) if m[0] & 1 == 1 => {
                    return Err(bad(format!(
                        "mac {} is a multicast address; use a unicast one (e.g. 02:..)",
                        n.mac
                    )))
                }
                Some(_) => {}
            }
            if !(MIN_MTU..=MAX_MTU).contains(&n.mtu()) {
                return Err(bad(format!(
                    "mtu must be {MIN_MTU} to {MAX_MTU}, got {}",
                    n.mtu()
                )));
            }
            if let Some(r) = &n.rate_limit {
                r.validate()
                    .map_err(|why| bad(format!("rate_limit: {why}")))?;
            }
        }
        for (field, value) in [
            ("serial_max_bytes", self.serial_max_bytes),
            ("log_max_bytes", self.log_max_bytes),
        ] {
            if !(MIN_OUTPUT_CAP..=MAX_OUTPUT_CAP).contains(&value) {
                return Err(ConfigError::OutputCap { field, value });
            }
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < MIN_GUEST_CID {
                return Err(ConfigError::Vsock(format!(
                    "guest_cid must be {MIN_GUEST_CID} or more, got {}",
                    v.guest_cid
                )));
            }
            if v.uds_path.as_os_str().is_empty() {
                return Err(ConfigError::Vsock("uds_path must not be empty".into()));
            }
        }
        if self.timeout_ms == Some(0) {
            return Err(ConfigError::Timeout);
        }
        if self.boot_on_request && self.api_sock.is_none() {
            return Err(ConfigError::ApiSock(
                "boot_on_request needs a control socket to be booted through; set api_sock (--api-sock)"
                    .into(),
            ));
        }
        if let Some(p) = &self.api_sock {
            let len = p.as_os_str().len();
            if len == 0 || len > MAX_SOCKET_PATH_LEN {
                return Err(ConfigError::ApiSock(format!(
                    "the path must be 1 to {MAX_SOCKET_PATH_LEN} bytes, got {len}"
                )));
            }
            if self.vsock.as_ref().is_some_and(|v| &v.uds_path == p) {
                return Err(ConfigError::ApiSock(
                    "the path must differ from vsock's uds_path".into(),
                ));
            }
        }
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in() {
        let cfg = VmConfig::from_json(r#"{"kernel": "/k"}"#).expect("valid");
        assert_eq!(cfg, VmConfig::new("/k"));
    }

    #[test]
    fn bounds_are_checked() {
        for (json, want) in [
            (r#"{"kernel":"/k","vcpus":0}"#, "vcpus"),
            (r#"{"kernel":"/k","vcpus":65}"#, "vcpus"),
            (r#"{"kernel":"/k","memory_mib":31}"#, "memory_mib"),
            (r#"{"kernel":"/k","timeout_ms":0}"#, "timeout_ms"),
            (
                r#"{"kernel":"/k","serial_max_bytes":4095}"#,
                "serial_max_bytes",
            ),
            (
                r#"{"kernel":"/k","log_max_bytes":1073741825}"#,
                "log_max_bytes",
            ),
            (r#"{"kernel":"/k","cmdline":"a\u0000b"}"#, "cmdline"),
            (r#"{"kernel":"/k","bogus":1}"#, "unknown field"),
            (r#"{"kernel":"/k","api_sock":""}"#, "api_sock"),
            (
                r#"{"kernel":"/k","vsock":{"guest_cid":3,"uds_path":"/s"},"api_sock":"/s"}"#,
                "api_sock",
            ),
            (r#"{"vcpus":1}"#, "missing field `kernel`"),
            (
                r#"{"kernel":"/k","disks":[{"path":"/d","format":"raw","serial":"this-serial-is-far-too-long"}]}"#,
                "serial",
            ),
            (
                r#"{"kernel":"/k","disks":[{"path":"/d"}]}"#,
                "missing field `format`",
            ),
            (
                r#"{"kernel":"/k","disks":[{"path":"/d","format":"auto"}]}"#,
                "unknown variant",
            ),
        ] {
            let err = VmConfig::from_json(json).expect_err(json).to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn api_sock_length_is_bounded() {
        let mut cfg = VmConfig::new("/k");
        cfg.api_sock = Some("/".repeat(MAX_SOCKET_PATH_LEN).into());
        cfg.validate().expect("107 bytes fit");
        cfg.api_sock = Some("/".repeat(MAX_SOCKET_PATH_LEN + 1).into());
        assert!(matches!(cfg.validate(), Err(ConfigError::ApiSock(_))));
        let mut held = VmConfig::new("/k");
        held.boot_on_request = true;
        let e = held.validate().expect_err("held without a socket");
        assert!(e.to_string().contains("--api-sock"), "{e}");
        held.api_sock = Some("/run/a.sock".into());
        held.validate().expect("held with a socket");
        let cfg = VmConfig::from_json(r#"{"kernel":"/k","api_sock":"/run/reddog/vm1.sock"}"#)
            .expect("valid");
        assert_eq!(
            cfg.api_sock.as_deref(),
            Some(std::path::Path::new("/run/reddog/vm1.sock"))
        );
    }

    #[test]
    fn net_settings_are_checked() {
        let good = r#"{"kernel":"/k","net":[{"tap":{"name":"rdg0"},"mac":"02:00:00:00:00:01"}]}"#;
        let cfg = VmConfig::from_json(good).expect("valid");
        assert_eq!(cfg.net[0].mtu(), DEFAULT_MTU);
        assert_eq!(cfg.net[0].mac_bytes(), Some([2, 0, 0, 0, 0, 1]));
        VmConfig::from_json(
            r#"{"kernel":"/k","net":[{"tap":{"fd":7},"mac":"02:00:00:00:00:01","mtu":9000}]}"#,
        )
        .expect("an inherited fd");
        for (json, want) in [
            (
                r#"{"tap":{"name":""},"mac":"02:00:00:00:00:01"}"#,
                "tap name",
            ),
            (
                r#"{"tap":{"name":"a-name-longer-than-15"},"mac":"02:00:00:00:00:01"}"#,
                "tap name",
            ),
            (
                r#"{"tap":{"name":"a/b"},"mac":"02:00:00:00:00:01"}"#,
                "tap name",
            ),
            (r#"{"tap":{"fd":1},"mac":"02:00:00:00:00:01"}"#, "tap fd"),
            (r#"{"tap":{"name":"t"},"mac":"02:00:00:00:00"}"#, "mac"),
            (
                r#"{"tap":{"name":"t"},"mac":"02:00:00:00:00:01:02"}"#,
                "mac",
            ),
            (
                r#"{"tap":{"name":"t"},"mac":"03:00:00:00:00:01"}"#,
                "multicast",
            ),
            (
                r#"{"tap":{"name":"t"},"mac":"02:00:00:00:00:01","mtu":67}"#,
                "mtu",
            ),
            (
                r#"{"tap":{"name":"t"},"mac":"02:00:00:00:00:01","rate_limit":{"ops":{"per_second":0}}}"#,
                "per_second",
            ),
        ] {
            let full = format!(r#"{{"kernel":"/k","net":[{json}]}}"#);
            let err = VmConfig::from_json(&full).expect_err(json).to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
        let disk = r#"{"kernel":"/k","disks":[{"path":"/d","format":"raw","rate_limit":{"bytes":{"per_second":0}}}]}"#;
        let err = VmConfig::from_json(disk)
            .expect_err("zero rate")
            .to_string();
        assert!(err.contains("disk 0: rate_limit"), "{err}");
    }

    #[test]
    fn serial_variants_round_trip() {
        for serial in [
            SerialOutput::Stdout,
            SerialOutput::Null,
            SerialOutput::File("/tmp/x".into()),
        ] {
            let mut cfg = VmConfig::new("/k");
            cfg.serial = serial;
            let json = serde_json::to_string(&cfg).expect("serialize");
            assert_eq!(VmConfig::from_json(&json).expect("parse"), cfg);
        }
    }
}
