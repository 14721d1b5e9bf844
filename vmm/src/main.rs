//! `reddog-vmm`: boots one VM from a JSON config or flags and exits with a status
//! that says how the guest stopped (see `vmm_api::ExitReason`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use vmm::seccomp::Seccomp;
use vmm_api::{
    BackingConfig, BootProtocol, DiskConfig, DiskFormat, NetConfig, RateLimit, SerialOutput,
    TapConfig, TokenBucket, VmConfig, VsockConfig,
};

const USAGE: &str = "\
reddog-vmm: boot one VM. Flags override the config file's fields.

Usage: reddog-vmm [OPTIONS]

Options:
  --config <FILE>          JSON VM config (vmm_api::VmConfig)
  --kernel <FILE>          kernel: vmlinux ELF (PVH or 64-bit entry) or bzImage
  --cmdline <TEXT>         kernel command line
  --initrd <FILE>          initial ramdisk
  --vcpus <N>              number of vCPUs (1-64)
  --memory-mib <N>         guest memory in MiB (32 or more)
  --boot-protocol <P>      auto, pvh or linux64
  --serial <WHERE>         serial console: stdout, null or a file path
  --disk <SPEC>            a virtio-blk disk, repeatable:
                           path=IMG,format=raw|qcow2|vhd[,backing=BASE,backing_format=F][,ro][,serial=ID]
                           [,rate_bytes=N[,rate_bytes_burst=N]][,rate_ops=N[,rate_ops_burst=N]]
                           (token buckets: bytes and requests per second; burst defaults to 1 s worth)
  --vsock <SPEC>           a virtio-vsock device: cid=N,uds=PATH (hybrid: the host connects to PATH
                           and writes `CONNECT <port>`; guest connections to the host go to PATH_<port>)
  --net <SPEC>             a virtio-net interface on a TAP, repeatable:
                           tap=NAME,mac=XX:XX:XX:XX:XX:XX[,mtu=N][,bw=BYTES/S][,pps=FRAMES/S]
                           or fd=N,mac=... (fd=: an inherited TAP opened with
                           IFF_TAP|IFF_NO_PI|IFF_VNET_HDR); bw= and pps= limit each direction
  --virtio-mmio-cmdline    also list the virtio-mmio devices on the kernel command line
                           (virtio_mmio.device=), for kernels that do not read them from ACPI
  --timeout-ms <N>         wall-clock limit in milliseconds
  --api-sock <PATH>        serve the control socket (docs/vmm-api.md) on this unix socket
  --wait-for-boot          build the VM but start the guest only on a `boot` request on the
                           control socket (needs --api-sock)
  --exit-report <FILE>     write the exit report (JSON) here instead of stderr (the file
                           is created at start, empty until the VM stops)
  --no-seccomp             do not install the per-thread seccomp filters (docs/isolation.md);
                           for debugging only: the VMM then runs unprotected, and says so
  -h, --help               print this help
  -V, --version            print the version
";

/// The command line. Parsed by hand: a full argument-parsing library is a
/// large share of the binary's text, and every VMM on a blade maps it.
#[derive(Debug, Default)]
struct Args {
    config: Option<PathBuf>,
    kernel: Option<PathBuf>,
    cmdline: Option<String>,
    initrd: Option<PathBuf>,
    vcpus: Option<u8>,
    memory_mib: Option<u32>,
    boot_protocol: Option<BootProtocol>,
    serial: Option<String>,
    disk: Vec<DiskConfig>,
    vsock: Option<VsockConfig>,
    net: Vec<NetConfig>,
    virtio_mmio_cmdline: bool,
    timeout_ms: Option<u64>,
    api_sock: Option<PathBuf>,
    wait_for_boot: bool,
    exit_report: Option<PathBuf>,
    no_seccomp: bool,
}

/// What the command line asks for.
enum Parsed {
    Run(Box<Args>),
    Help,
    Version,
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.parse()
        .map_err(|e| format!("invalid value {v:?} for {flag}: {e}"))
}

impl Args {
    fn parse(mut it: impl Iterator<Item = String>) -> Result<Parsed, String> {
        let mut a = Args::default();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let mut value = || -> Result<String, String> {
                match &inline {
                    Some(v) => Ok(v.clone()),
                    None => it
                        .next()
                        .ok_or_else(|| format!("{flag} needs a value (see --help)")),
                }
            };
            match flag.as_str() {
                "-h" | "--help" => return Ok(Parsed::Help),
                "-V" | "--version" => return Ok(Parsed::Version),
                "--config" => a.config = Some(value()?.into()),
                "--kernel" => a.kernel = Some(value()?.into()),
                "--cmdline" => a.cmdline = Some(value()?),
                "--initrd" => a.initrd = Some(value()?.into()),
                "--vcpus" => a.vcpus = Some(number(&flag, &value()?)?),
                "--memory-mib" => a.memory_mib = Some(number(&flag, &value()?)?),
                "--boot-protocol" => a.boot_protocol = Some(parse_protocol(&value()?)?),
                "--serial" => a.serial = Some(value()?),
                "--disk" => a.disk.push(parse_disk(&value()?)?),
                "--vsock" => a.vsock = Some(parse_vsock(&value()?)?),
                "--net" => a.net.push(parse_net(&value()?)?),
                "--virtio-mmio-cmdline" if inline.is_none() => a.virtio_mmio_cmdline = true,
                "--wait-for-boot" if inline.is_none() => a.wait_for_boot = true,
                "--no-seccomp" if inline.is_none() => a.no_seccomp = true,
                "--timeout-ms" => a.timeout_ms = Some(number(&flag, &value()?)?),
                "--api-sock" => a.api_sock = Some(value()?.into()),
                "--exit-report" => a.exit_report = Some(value()?.into()),
                other => return Err(format!("unexpected argument {other:?} (see --help)")),
            }
        }
        Ok(Parsed::Run(Box::new(a)))
    }
}

fn parse_protocol(s: &str) -> Result<BootProtocol, String> {
    match s {
        "auto" => Ok(BootProtocol::Auto),
        "pvh" => Ok(BootProtocol::Pvh),
        "linux64" => Ok(BootProtocol::Linux64),
        other => Err(format!(
            "unknown boot protocol {other:?}; use auto, pvh or linux64"
        )),
    }
}

fn parse_format(s: &str) -> Result<DiskFormat, String> {
    match s {
        "raw" => Ok(DiskFormat::Raw),
        "qcow2" => Ok(DiskFormat::Qcow2),
        "vhd" => Ok(DiskFormat::Vhd),
        other => Err(format!(
            "unknown disk format {other:?}; use raw, qcow2 or vhd"
        )),
    }
}

/// Collects `rate_bytes`, `rate_bytes_burst`, `rate_ops`, `rate_ops_burst`
/// from a device spec into a [`RateLimit`]; `Ok(false)`: not a rate option.
fn parse_rate_option(limit: &mut RateLimit, key: &str, v: &str) -> Result<bool, String> {
    let (slot, is_burst) = match key {
        "rate_bytes" => (&mut limit.bytes, false),
        "rate_bytes_burst" => (&mut limit.bytes, true),
        "rate_ops" => (&mut limit.ops, false),
        "rate_ops_burst" => (&mut limit.ops, true),
        _ => return Ok(false),
    };
    let n = number::<u64>(key, v)?;
    let bucket = slot.get_or_insert(TokenBucket {
        per_second: 0,
        burst: None,
    });
    if is_burst {
        bucket.burst = Some(n);
    } else {
        bucket.per_second = n;
    }
    Ok(true)
}

/// The rate limit collected by [`parse_rate_option`], checked (None: unlimited).
fn finish_rate_limit(limit: RateLimit) -> Result<Option<RateLimit>, String> {
    if limit == RateLimit::default() {
        return Ok(None);
    }
    limit
        .validate()
        .map_err(|e| format!("{e} (a *_burst option needs its rate_* option)"))?;
    Ok(Some(limit))
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (mut path, mut format, mut backing, mut backing_format) = (None, None, None, None);
    let (mut read_only, mut serial) = (false, String::new());
    let mut rate = RateLimit::default();
    for part in s.split(',') {
        if let Some((k, v)) = part.split_once('=') {
            if parse_rate_option(&mut rate, k, v)? {
                continue;
            }
        }
        match part.split_once('=') {
            Some(("path", v)) => path = Some(PathBuf::from(v)),
            Some(("format", v)) => format = Some(parse_format(v)?),
            Some(("backing", v)) => backing = Some(PathBuf::from(v)),
            Some(("backing_format", v)) => backing_format = Some(parse_format(v)?),
            Some(("serial", v)) => serial = v.to_owned(),
            None if part == "ro" => read_only = true,
            _ => return Err(format!("unknown disk option {part:?}")),
        }
    }
    let backing = match (backing, backing_format) {
        (Some(path), Some(format)) => Some(BackingConfig { path, format }),
        (None, None) => None,
        _ => return Err("backing= and backing_format= go together".into()),
    };
    Ok(DiskConfig {
        path: path.ok_or("a disk needs path=")?,
        format: format
            .ok_or("a disk needs format= (raw, qcow2 or vhd): formats are never guessed")?,
        backing,
        read_only,
        serial,
        rate_limit: finish_rate_limit(rate)?,
    })
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let (mut cid, mut uds) = (None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("cid", v)) => cid = Some(v.parse::<u32>().map_err(|e| format!("cid: {e}"))?),
            Some(("uds", v)) => uds = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown vsock option {part:?}; use cid=N,uds=PATH")),
        }
    }
    Ok(VsockConfig {
        guest_cid: cid.ok_or("vsock needs cid=")?,
        uds_path: uds.ok_or("vsock needs uds=")?,
    })
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    let (mut tap, mut mac, mut mtu) = (None, None, None);
    let mut limit = vmm_api::RateLimit::default();
    let bucket = |k: &str, v: &str| -> Result<Option<vmm_api::TokenBucket>, String> {
        let per_second = v.parse::<u64>().map_err(|e| format!("net {k}={v}: {e}"))?;
        Ok(Some(vmm_api::TokenBucket {
            per_second,
            burst: None,
        }))
    };
    for part in s.split(',') {
        let t = match part.split_once('=') {
            Some(("tap", v)) => Some(TapConfig::Name(v.to_owned())),
            Some(("fd", v)) => Some(TapConfig::Fd(
                v.parse::<i32>().map_err(|e| format!("net fd={v}: {e}"))?,
            )),
            Some(("mac", v)) => {
                mac = Some(v.to_owned());
                None
            }
            Some(("mtu", v)) => {
                mtu = Some(v.parse::<u16>().map_err(|e| format!("net mtu={v}: {e}"))?);
                None
            }
            Some(("bw", v)) => {
                limit.bytes = bucket("bw", v)?;
                None
            }
            Some(("pps", v)) => {
                limit.ops = bucket("pps", v)?;
                None
            }
            _ => {
                return Err(format!(
                    "unknown net option {part:?}; use tap=NAME or fd=N, mac=XX:..[,mtu=N]"
                ))
            }
        };
        if let Some(t) = t {
            if tap.replace(t).is_some() {
                return Err("a net interface takes one of tap= or fd=".into());
            }
        }
    }
    Ok(NetConfig {
        tap: tap.ok_or("a net interface needs tap=NAME or fd=N")?,
        mac: mac.ok_or("a net interface needs mac=XX:XX:XX:XX:XX:XX")?,
        mtu,
        rate_limit: (limit != vmm_api::RateLimit::default()).then_some(limit),
    })
}

fn config_from(args: &Args) -> anyhow::Result<VmConfig> {
    let mut cfg = match (&args.config, &args.kernel) {
        (Some(path), _) => VmConfig::from_file(path)?,
        (None, Some(kernel)) => VmConfig::new(kernel.clone()),
        (None, None) => anyhow::bail!("give --kernel or --config (see --help)"),
    };
    if let Some(k) = &args.kernel {
        cfg.kernel = k.clone();
    }
    if let Some(c) = &args.cmdline {
        cfg.cmdline = c.clone();
    }
    if let Some(i) = &args.initrd {
        cfg.initrd = Some(i.clone());
    }
    if let Some(v) = args.vcpus {
        cfg.vcpus = v;
    }
    if let Some(m) = args.memory_mib {
        cfg.memory_mib = m;
    }
    if let Some(p) = args.boot_protocol {
        cfg.boot_protocol = p;
    }
    if let Some(s) = &args.serial {
        cfg.serial = match s.as_str() {
            "stdout" => SerialOutput::Stdout,
            "null" => SerialOutput::Null,
            path => SerialOutput::File(path.into()),
        };
    }
    cfg.disks.extend(args.disk.iter().cloned());
    if args.virtio_mmio_cmdline {
        cfg.virtio_mmio_cmdline = true;
    }
    if let Some(v) = &args.vsock {
        cfg.vsock = Some(v.clone());
    }
    cfg.net.extend(args.net.iter().cloned());
    if let Some(t) = args.timeout_ms {
        cfg.timeout_ms = Some(t);
    }
    if args.wait_for_boot {
        cfg.boot_on_request = true;
    }
    if let Some(p) = &args.api_sock {
        cfg.api_sock = Some(p.clone());
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The log on stderr, capped at the default until the config says otherwise.
fn init_logging() -> Option<vmm::logging::LogCap> {
    let level = std::env::var("REDDOG_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    match vmm::logging::init(level, std::io::stderr, vmm::logging::DEFAULT_LOG_MAX_BYTES) {
        Ok(cap) => Some(cap),
        Err(e) => {
            eprintln!("reddog-vmm: {e}; running without a log");
            None
        }
    }
}

fn main() {
    let start = Instant::now();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            std::process::exit(0);
        }
        Ok(Parsed::Version) => {
            println!("reddog-vmm {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("reddog-vmm: error: {e}");
            std::process::exit(2);
        }
    };
    let log_cap = init_logging();
    let code = match run(&args, start, log_cap.as_ref()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("reddog-vmm: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &Args, start: Instant, log_cap: Option<&vmm::logging::LogCap>) -> anyhow::Result<i32> {
    let cfg = config_from(args)?;
    if let Some(cap) = log_cap {
        cap.set_max(cfg.log_max_bytes);
    }
    let seccomp = if args.no_seccomp {
        tracing::warn!(
            "--no-seccomp: the VMM's threads run without seccomp filters; a bug a guest \
             can reach has every syscall the VMM's user has"
        );
        Seccomp::off()
    } else {
        Seccomp::on()?
    };
    // Opened now: the main thread's filter has no `open` once the VM runs.
    let report_file = match &args.exit_report {
        Some(path) => Some(std::fs::File::create(path).map_err(|e| {
            anyhow::anyhow!("cannot create the exit report {}: {e}", path.display())
        })?),
        None => None,
    };
    let vmm = vmm::build_and_boot(&cfg, start, &seccomp)?;
    let report = vmm.wait();
    if report.regs.is_some() || report.exit_code != 0 {
        eprintln!(
            "reddog-vmm: VM stopped: {} (exit status {})",
            report.detail, report.exit_code
        );
        if let Some(r) = &report.regs {
            eprintln!(
                "reddog-vmm: vCPU {} registers: rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                report.vcpu.unwrap_or(0), r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.cr0, r.cr3, r.cr4, r.efer, r.cs
            );
        }
    }
    let written = write_report(report_file, &report);
    // Subscribers learn why right before the exit (after the report is written).
    vmm.announce_stop(&report);
    written?;
    let _ = std::io::stdout().flush();
    Ok(report.exit_code)
}

fn write_report(file: Option<std::fs::File>, report: &vmm_api::ExitReport) -> anyhow::Result<()> {
    let line = serde_json::to_string(report)?;
    match file {
        Some(mut f) => f.write_all((line + "\n").as_bytes())?,
        None => {
            let mut err = std::io::stderr().lock();
            writeln!(err, "{line}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        Args::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags_and_values() {
        let Ok(Parsed::Run(a)) = parse(&[
            "--kernel",
            "/k",
            "--cmdline=a b=c",
            "--vcpus",
            "2",
            "--disk",
            "path=/d,format=raw,ro,serial=x",
            "--disk=path=/e,format=qcow2,backing=/b,backing_format=raw,rate_bytes=1000,rate_ops=10,rate_ops_burst=2",
            "--vsock",
            "cid=3,uds=/v",
            "--virtio-mmio-cmdline",
            "--net",
            "tap=rdg0,mac=02:00:00:00:00:01,mtu=9000",
            "--net=fd=7,mac=02:00:00:00:00:02,bw=1000000,pps=100",
            "--no-seccomp",
        ]) else {
            panic!("should parse");
        };
        assert_eq!(a.kernel.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(a.cmdline.as_deref(), Some("a b=c"));
        assert_eq!(a.vcpus, Some(2));
        assert_eq!(a.disk.len(), 2);
        assert!(a.disk[0].read_only);
        assert_eq!(
            a.disk[1].backing.as_ref().map(|b| b.format),
            Some(DiskFormat::Raw)
        );
        assert_eq!(a.disk[0].rate_limit, None);
        let rate = a.disk[1].rate_limit.expect("a rate limit");
        assert_eq!(
            (
                rate.bytes.map(|b| (b.per_second, b.burst)),
                rate.ops.map(|b| (b.per_second, b.burst))
            ),
            (Some((1000, None)), Some((10, Some(2))))
        );
        assert_eq!(a.vsock.as_ref().map(|v| v.guest_cid), Some(3));
        assert!(a.virtio_mmio_cmdline);
        assert_eq!(a.net.len(), 2);
        assert_eq!(a.net[0].tap, TapConfig::Name("rdg0".into()));
        assert_eq!(a.net[0].mtu, Some(9000));
        assert_eq!(a.net[1].tap, TapConfig::Fd(7));
        assert_eq!(a.net[1].mac, "02:00:00:00:00:02");
        assert!(a.net[0].rate_limit.is_none());
        let l = a.net[1].rate_limit.expect("limited");
        assert_eq!(l.bytes.map(|b| b.per_second), Some(1_000_000));
        assert_eq!(l.ops.map(|b| b.per_second), Some(100));
        assert!(a.no_seccomp);
        let Ok(Parsed::Run(a)) = parse(&["--kernel", "/k"]) else {
            panic!("should parse");
        };
        assert!(!a.no_seccomp, "filters are on unless asked");
        assert!(matches!(parse(&["-h"]), Ok(Parsed::Help)));
        assert!(matches!(parse(&["--version"]), Ok(Parsed::Version)));
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        for (args, want) in [
            (vec!["--vcpus"], "needs a value"),
            (vec!["--vcpus", "many"], "invalid value"),
            (vec!["--bogus"], "unexpected argument"),
            (vec!["--boot-protocol", "efi"], "unknown boot protocol"),
            (vec!["--disk", "path=/d"], "never guessed"),
            (
                vec!["--disk", "path=/d,format=raw,rate_bytes_burst=5"],
                "needs its rate_",
            ),
            (
                vec!["--disk", "path=/d,format=raw,rate_ops=x"],
                "invalid value",
            ),
            (vec!["--vsock", "uds=/v"], "cid="),
            (vec!["--net", "mac=02:00:00:00:00:01"], "tap=NAME or fd=N"),
            (
                vec!["--net", "tap=a,fd=4,mac=02:00:00:00:00:01"],
                "one of tap= or fd=",
            ),
            (vec!["--net", "tap=a"], "needs mac="),
            (vec!["--net", "tap=a,mac=x,speed=9"], "unknown net option"),
            (vec!["--net", "fd=x,mac=x"], "net fd=x"),
            (vec!["--virtio-mmio-cmdline=yes"], "unexpected argument"),
            (vec!["--no-seccomp=yes"], "unexpected argument"),
        ] {
            let err = parse(&args).err().unwrap_or_default();
            assert!(err.contains(want), "{args:?}: {err:?}");
        }
    }
}
