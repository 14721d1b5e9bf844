//! `reddog-vmm`: boots one VM from a JSON config or flags and exits with a status
//! that says how the guest stopped (see `vmm_api::ExitReason`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use vmm_api::{
    BackingConfig, BootProtocol, DiskConfig, DiskFormat, SerialOutput, VmConfig, VsockConfig,
};

/// Boot one VM. Flags override the config file's fields.
#[derive(Parser, Debug)]
#[command(name = "reddog-vmm", version, about)]
struct Args {
    /// JSON VM config (vmm_api::VmConfig).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel: vmlinux ELF (PVH or 64-bit entry) or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Entry protocol: auto, pvh or linux64.
    #[arg(long, value_parser = parse_protocol)]
    boot_protocol: Option<BootProtocol>,
    /// Serial console: "stdout", "null" or a file path.
    #[arg(long)]
    serial: Option<String>,
    /// A virtio-blk disk: `path=IMG,format=raw|qcow2|vhd[,backing=BASE,backing_format=F][,ro][,serial=ID]`.
    /// Repeat for more disks.
    #[arg(long, value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// A virtio-vsock device: `cid=N,uds=PATH` (hybrid: host connects to PATH and
    /// writes `CONNECT <port>`; guest connections to the host go to `PATH_<port>`).
    #[arg(long, value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Also list the virtio-mmio devices on the kernel command line
    /// (`virtio_mmio.device=`), for kernels that do not read them from ACPI.
    #[arg(long)]
    virtio_mmio_cmdline: bool,
    /// Wall-clock limit in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Serve the control socket (vmm_api::control, docs/vmm-api.md) on this
    /// unix socket path: pause, resume, shutdown, info, metrics, events.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Write the exit report (JSON) to this file instead of stderr.
    #[arg(long)]
    exit_report: Option<PathBuf>,
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

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (mut path, mut format, mut backing, mut backing_format) = (None, None, None, None);
    let (mut read_only, mut serial) = (false, String::new());
    for part in s.split(',') {
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
    if let Some(t) = args.timeout_ms {
        cfg.timeout_ms = Some(t);
    }
    if let Some(p) = &args.api_sock {
        cfg.api_sock = Some(p.clone());
    }
    cfg.validate()?;
    Ok(cfg)
}

fn init_logging() {
    let level = std::env::var("REDDOG_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() {
    let start = Instant::now();
    let args = Args::parse();
    init_logging();
    let code = match run(&args, start) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("reddog-vmm: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &Args, start: Instant) -> anyhow::Result<i32> {
    let cfg = config_from(args)?;
    let vmm = vmm::build_and_boot(&cfg, start)?;
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
    let written = write_report(args, &report);
    // Subscribers learn why right before the exit (after the report is written).
    vmm.announce_stop(&report);
    written?;
    let _ = std::io::stdout().flush();
    Ok(report.exit_code)
}

fn write_report(args: &Args, report: &vmm_api::ExitReport) -> anyhow::Result<()> {
    let line = serde_json::to_string(report)?;
    match &args.exit_report {
        Some(path) => std::fs::write(path, line + "\n")?,
        None => {
            let mut err = std::io::stderr().lock();
            writeln!(err, "{line}")?;
        }
    }
    Ok(())
}
