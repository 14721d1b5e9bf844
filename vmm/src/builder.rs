//! The boot recipe, top to bottom: KVM, memory, kernel, boot structures, ACPI,
//! devices, vCPUs, run; then wait for the VM to stop.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_api::{platform, ExitReason, ExitReport, SerialOutput, VmConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiError};
use crate::arch::{boot, layout, regs::EntryMode};
use crate::control::metrics::CountingWriter;
use crate::control::server::ControlContext;
use crate::control::{ControlServer, RunControl, ServerError};
use crate::devices::mmio_manager::{DeviceManagerError, MmioDeviceManager};
use crate::devices::serial::{RotatingFile, SerialDevice};
use crate::devices::virtio::block::{BlockDevice, BlockError};
use crate::devices::virtio::net::{NetDevice, NetError};
use crate::devices::virtio::vsock::{VsockDevice, VsockError};
use crate::devices::{boot_timer::BootTimer, Bus};
use crate::loader::{self, LoaderError};
use crate::seccomp::{Ready, Seccomp, SeccompError, ThreadKind};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{StopEvent, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Errors building or booting a VM (`build_and_boot`). Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] vmm_api::ConfigError),
    /// KVM or the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel or initrd.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A boot structure did not fit in guest memory.
    #[error("cannot write the {what} into guest memory: {source}")]
    BootData {
        /// Which structure.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// The serial output file.
    #[error("cannot open serial output file {path}: {source}")]
    SerialFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A disk image could not be opened.
    #[error("cannot open disk {path} as {format:?}: {source}")]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// The format the config named.
        format: vmm_api::DiskFormat,
        /// Why.
        source: vhd::DiskError,
    },
    /// A block device could not be built.
    #[error("disk {path}: {source}")]
    Block {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        source: BlockError,
    },
    /// The vsock device could not be built.
    #[error("vsock: {0}")]
    Vsock(#[from] VsockError),
    /// A virtio-net device could not be built.
    #[error("net {index}: {source}")]
    Net {
        /// The interface's index in the config.
        index: usize,
        /// Why.
        source: NetError,
    },
    /// A virtio device could not be attached.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// The control socket (`api_sock`).
    #[error(transparent)]
    Control(#[from] ServerError),
    /// A thread's seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// Host resources (eventfd, irqfd, threads).
    #[error("host resource error ({what}): {source}")]
    Host {
        /// What failed.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// A running VM: its vCPU threads report to `stops`.
pub struct Vmm {
    start: Instant,
    timeout: Option<Duration>,
    bus: Arc<Bus>,
    stops: Receiver<StopEvent>,
    first_run_us: Arc<AtomicU64>,
    control: Option<ControlServer>,
    /// The vsock listener's socket file, removed at the stop.
    vsock_uds: Option<std::path::PathBuf>,
    // Kept alive until the process ends: KVM maps this memory.
    _memory: GuestMemoryMmap,
    _vm: Vm,
}

fn serial_sink(out: &SerialOutput, max_bytes: u64) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::File(path) => {
            let f =
                RotatingFile::open(path, max_bytes).map_err(|source| BuildError::SerialFile {
                    path: path.clone(),
                    source,
                })?;
            Box::new(f)
        }
    })
}

/// Builds the VM described by `cfg` and starts its vCPUs. `start` is the moment
/// the VMM process started (the boot timer counts from it). With `seccomp` on,
/// every thread installs its filter before the guest runs, and the calling
/// thread installs the main thread's before this returns: what it may do after
/// is `seccomp::ThreadKind::Main`'s table.
pub fn build_and_boot(
    cfg: &VmConfig,
    start: Instant,
    seccomp: &Seccomp,
) -> Result<Vmm, BuildError> {
    cfg.validate()?;
    let mem_bytes = cfg.memory_bytes();

    // 1. KVM: the VM.
    let vm = Vm::new()?;

    // 2. Guest memory, registered with KVM, then the in-kernel irqchip.
    let mem = memory::create_guest_memory(mem_bytes)?;
    vm.register_memory(&mem)?;
    vm.create_irqchip()?;

    // 3-7 run while another thread creates the PIT (a slow ioctl).
    let run_ctl = Arc::new(RunControl::new(cfg.vcpus, cfg.boot_on_request));
    let (guest, pit) = std::thread::scope(|s| {
        let pit = s.spawn(|| vm.create_pit());
        let guest = load_and_attach(cfg, &vm, &mem, start, &run_ctl, seccomp);
        (guest, pit.join())
    });
    let (bus, vcpus, mut ready) = guest?;
    match pit {
        Ok(result) => result?,
        Err(_) => {
            return Err(BuildError::Host {
                what: "PIT creation thread",
                source: std::io::Error::other("panicked"),
            })
        }
    }

    // 8. The vCPU threads: each installs its filter, then waits for step 10.
    let (tx, rx) = mpsc::channel();
    let first_run_us = Arc::new(AtomicU64::new(0));
    let released = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(vcpus.len());
    for (index, vcpu) in vcpus.into_iter().enumerate().rev() {
        let (bus, tx, first) = (bus.clone(), tx.clone(), first_run_us.clone());
        let ctl = run_ctl.clone();
        let index_tx = tx.clone();
        let released = released.clone();
        let (thread, vcpu_ready) = seccomp
            .spawn(format!("vcpu{index}"), ThreadKind::Vcpu, move || {
                // Never dropped: the last reference to the devices must not go
                // on a vCPU thread, whose filter has none of what tearing them
                // down takes (unlocking disk images, closing vsock
                // connections). The process exit tears the VM down.
                let keep = bus.clone();
                while !released.load(Ordering::Acquire) {
                    std::thread::park();
                }
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    vcpu.run(bus, tx, start, first, ctl)
                }));
                std::mem::forget(keep);
                if result.is_err() {
                    let _ = index_tx.send(StopEvent {
                        reason: ExitReason::VcpuError,
                        detail: "a vCPU thread panicked".into(),
                        vcpu: u8::MAX,
                        regs: None,
                    });
                }
            })
            .map_err(|source| BuildError::Host {
                what: "vCPU thread",
                source,
            })?;
        threads.push(thread);
        ready.push(vcpu_ready);
    }
    // Started last to first: the gate indexes them by vCPU.
    threads.reverse();
    let vcpu_threads: Vec<std::thread::Thread> =
        threads.iter().map(|t| t.thread().clone()).collect();
    run_ctl.gate.set_threads(threads);

    // 9. The control socket, while the vCPU threads start (with
    //    `boot_on_request` they then wait on the gate for the socket's `boot`).
    let control = match &cfg.api_sock {
        Some(path) => {
            let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BuildError::Host {
                what: "GED eventfd",
                source,
            })?;
            vm.fd
                .register_irqfd(&ged_irq, platform::GED_IRQ)
                .map_err(|e| BuildError::Host {
                    what: "GED irqfd",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })?;
            bus.ged().connect_irq(ged_irq);
            let ctx = ControlContext {
                cfg: cfg.clone(),
                start,
                bus: bus.clone(),
                run: run_ctl,
                stops: tx,
                first_run_us: first_run_us.clone(),
                seccomp: seccomp.clone(),
            };
            let (server, server_ready) = ControlServer::start(path, ctx)?;
            ready.extend(server_ready);
            Some(server)
        }
        None => None,
    };

    // 10. Every thread has its filter: the main thread's goes on last (all
    //     files, KVM fds, memory and sockets are open), then the vCPUs run.
    for r in ready {
        r.wait()?;
    }
    seccomp.install(ThreadKind::Main)?;
    released.store(true, Ordering::Release);
    for t in &vcpu_threads {
        t.unpark();
    }

    Ok(Vmm {
        start,
        timeout: cfg.timeout_ms.map(Duration::from_millis),
        bus,
        stops: rx,
        first_run_us,
        control,
        vsock_uds: cfg.vsock.as_ref().map(|v| v.uds_path.clone()),
        _memory: mem,
        _vm: vm,
    })
}

/// What steps 3 to 7 built: the buses, the vCPUs, and the devices' I/O
/// threads' word on their filters.
type Attached = (Arc<Bus>, Vec<Vcpu>, Vec<Ready>);

/// Steps 3 to 7 of the recipe: kernel, devices, ACPI and boot structures, vCPUs.
fn load_and_attach(
    cfg: &VmConfig,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    start: Instant,
    run_ctl: &RunControl,
    seccomp: &Seccomp,
) -> Result<Attached, BuildError> {
    let mem_bytes = cfg.memory_bytes();

    // 3. Kernel and initrd.
    let kernel = loader::load_kernel(mem, &cfg.kernel, cfg.boot_protocol)?;
    let initrd = match &cfg.initrd {
        Some(path) => Some(loader::load_initrd(mem, mem_bytes, path, kernel.end)?),
        None => None,
    };
    // 4. Virtio devices: one block device per disk, then vsock, then one
    //    virtio-net per interface, each in its own window, each with its I/O
    //    thread started now (filtered before the guest can drive it).
    let mut mmio = MmioDeviceManager::default();
    let mut ready = Vec::new();
    let io_err = |source| BuildError::Host {
        what: "device I/O thread",
        source,
    };
    for (index, disk) in cfg.disks.iter().enumerate() {
        let image = open_disk(disk)?;
        let mut block = BlockDevice::new(image, disk.read_only, &disk.serial)
            .map_err(|source| BuildError::Block {
                path: disk.path.clone(),
                source,
            })?
            .with_index(index)
            .with_rate_limit(disk.rate_limit);
        ready.push(block.start_io_thread(seccomp).map_err(io_err)?);
        mmio.attach(&vm.fd, mem, Box::new(block))?;
    }
    if let Some(v) = &cfg.vsock {
        let mut vsock = VsockDevice::new(v)?;
        ready.push(vsock.start_io_thread(seccomp).map_err(io_err)?);
        mmio.attach(&vm.fd, mem, Box::new(vsock))?;
    }
    for (index, n) in cfg.net.iter().enumerate() {
        let mut net = NetDevice::new(n)
            .map_err(|source| BuildError::Net { index, source })?
            .with_index(index);
        if let Ok(mut all) = run_ctl.counters.net.lock() {
            all.push(net.counters());
        }
        ready.push(net.start_io_thread(seccomp).map_err(io_err)?);
        mmio.attach(&vm.fd, mem, Box::new(net))?;
    }

    // 5. The command line (with `virtio_mmio.device=` entries if asked), the
    //    ACPI tables (with the virtio devices in the DSDT) and the boot
    //    structures that point at them.
    let mut cmdline = cfg.cmdline.clone();
    if cfg.virtio_mmio_cmdline {
        for d in mmio.infos() {
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{:#x}:{}", d.base, d.irq));
        }
    }
    if cmdline.len() >= vmm_api::config::MAX_CMDLINE_LEN {
        return Err(BuildError::Config(vmm_api::ConfigError::Cmdline(
            cmdline.len(),
        )));
    }
    loader::load_cmdline(mem, &cmdline).map_err(|source| BuildError::BootData {
        what: "command line",
        source,
    })?;
    let rsdp = acpi::write_tables(mem, cfg.vcpus, &mmio.infos())?;
    write_boot_info(mem, mem_bytes, &kernel, cmdline.len() + 1, rsdp, initrd)?;

    // 6. Legacy devices: COM1 with its irqfd, the boot timer, i8042 and ACPI registers.
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BuildError::Host {
        what: "serial eventfd",
        source,
    })?;
    vm.fd
        .register_irqfd(&serial_irq, platform::SERIAL_IRQ)
        .map_err(|e| BuildError::Host {
            what: "serial irqfd",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    let sink = CountingWriter::new(
        serial_sink(&cfg.serial, cfg.serial_max_bytes)?,
        run_ctl.counters.serial_bytes_out.clone(),
    );
    let serial = SerialDevice::new(serial_irq, Box::new(sink));
    let bus = Arc::new(Bus::new(serial, BootTimer::new(start), mmio));

    // 7. vCPUs: the boot vCPU enters the kernel, the others wait for INIT/SIPI.
    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for index in 0..cfg.vcpus {
        let vcpu = Vcpu::new(vm, index)?;
        let entry = (index == 0).then_some((kernel.mode, kernel.entry));
        vcpu.configure(vm, mem, cfg.vcpus, entry)?;
        vcpus.push(vcpu);
    }
    Ok((bus, vcpus, ready))
}

/// Opens a disk in the format the config names (never guessed). An overlay's
/// backing image is opened read-only from the path the config gives, never from
/// the name recorded inside the (guest-writable) overlay.
fn open_disk(disk: &vmm_api::DiskConfig) -> Result<Arc<dyn vhd::DiskImage>, BuildError> {
    let mut opts = if disk.read_only {
        vhd::OpenOptions::read_only()
    } else {
        vhd::OpenOptions::read_write()
    };
    if let Some(b) = &disk.backing {
        let base = vhd::open(&b.path, format_of(b.format), vhd::OpenOptions::read_only()).map_err(
            |source| BuildError::Disk {
                path: b.path.clone(),
                format: b.format,
                source,
            },
        )?;
        opts = opts.with_backing(base);
    }
    vhd::open(&disk.path, format_of(disk.format), opts).map_err(|source| BuildError::Disk {
        path: disk.path.clone(),
        format: disk.format,
        source,
    })
}

fn format_of(f: vmm_api::DiskFormat) -> vhd::Format {
    match f {
        vmm_api::DiskFormat::Raw => vhd::Format::Raw,
        vmm_api::DiskFormat::Qcow2 => vhd::Format::Qcow2,
        vmm_api::DiskFormat::Vhd => vhd::Format::Vhd,
    }
}

fn write_boot_info(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &loader::LoadedKernel,
    cmdline_len: usize,
    rsdp: GuestAddress,
    initrd: Option<boot::InitrdPlacement>,
) -> Result<(), BuildError> {
    let wr = |bytes: &[u8], addr: u64, what: &'static str| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| BuildError::BootData { what, source })
    };
    match kernel.mode {
        EntryMode::Pvh => {
            let b = boot::pvh_start_info(mem_bytes, layout::CMDLINE_ADDR, rsdp.0, initrd);
            wr(&b.start_info, layout::START_INFO_ADDR, "PVH start info")?;
            if let Some(m) = b.modlist {
                wr(&m, layout::MODLIST_ADDR, "PVH module list")?;
            }
            wr(&b.memmap, layout::MEMMAP_ADDR, "PVH memory map")?;
        }
        EntryMode::Long64 => {
            let zp = boot::linux_boot_params(
                mem_bytes,
                kernel.setup_header.as_deref(),
                layout::CMDLINE_ADDR,
                cmdline_len,
                rsdp.0,
                initrd,
            );
            wr(&zp, layout::ZERO_PAGE_ADDR, "Linux boot parameters")?;
        }
    }
    Ok(())
}

impl Vmm {
    /// Waits until a vCPU stops the VM, the control socket asks for a stop, or
    /// the wall-clock limit passes; flushes the console and returns the report.
    /// The caller then calls [`Vmm::announce_stop`] and ends the process.
    pub fn wait(&self) -> ExitReport {
        let event = match self.timeout {
            Some(limit) => {
                let left = limit.saturating_sub(self.start.elapsed());
                self.stops.recv_timeout(left).ok()
            }
            None => self.stops.recv().ok(),
        };
        let event = event.unwrap_or_else(|| StopEvent {
            reason: ExitReason::Timeout,
            detail: match self.timeout {
                Some(t) => format!("wall-clock limit of {} ms passed", t.as_millis()),
                None => "every vCPU thread ended".into(),
            },
            vcpu: u8::MAX,
            regs: None,
        });
        self.bus.flush_console();
        let first_run = self.first_run_us.load(Ordering::SeqCst);
        ExitReport {
            reason: event.reason,
            exit_code: event.reason.exit_code(),
            detail: event.detail,
            boot_time_us: self.bus.boot_timer().boot_time_us(),
            first_run_us: (first_run > 0).then(|| first_run - 1),
            total_us: self.start.elapsed().as_micros() as u64,
            vcpu: (event.vcpu != u8::MAX).then_some(event.vcpu),
            regs: event.regs,
        }
    }
    /// Tells control socket subscribers that the VM stops, and why (the
    /// `stopping` event), and removes the socket. Call right before exiting.
    pub fn announce_stop(&self, report: &ExitReport) {
        if let Some(c) = &self.control {
            c.announce_stop(report);
        }
        // The devices are never torn down (see the vCPU threads in
        // `build_and_boot`): the vsock listener's file goes here.
        if let Some(p) = &self.vsock_uds {
            let _ = std::fs::remove_file(p);
        }
    }
}
