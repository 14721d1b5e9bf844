//! `reddog-guest` as PID 1. In probe mode: bring the platform up, run the
//! checks the kernel command line asks for, report on the console, power off.
//! In agent mode: switch into the OS disk, supervise the role, talk to the
//! host agent, shut down when told.
//!
//! Outside a VM (not PID 1) it runs the agent against a unix socket:
//! `reddog-guest --host-socket PATH [--role-dir DIR] [--passwd FILE]`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_agent::cmdline::{self, Mode};
use guest_agent::link::{LinkConfig, OutboxLimits};
use guest_agent::supervisor::{self, AgentConfig, Status};
use guest_agent::transport::{self, Transport};
use guest_agent::{backoff, instance, manifest, pid1, probe, probe::say, sys};
use guest_proto::LogLevel;

/// Where the initramfs lists its modules, in load order.
const MODULE_LIST: &str = "/etc/reddog/modules";

fn main() {
    if std::process::id() != 1 {
        host_main();
        return;
    }
    probe::mount_kernel_filesystems();
    probe::mark_boot_timer();
    say(&format!("init pid={}", std::process::id()));
    let cmdline = pid1::read_small("/proc/cmdline");
    let (opts, notes) = cmdline::parse(&cmdline);
    for n in &notes {
        say(n);
    }
    probe::load_modules(Path::new(MODULE_LIST));
    match opts.mode() {
        Mode::Probe => probe_mode(&opts),
        Mode::Agent => agent_mode(&opts, notes),
    }
}

fn link_config(transport: Arc<dyn Transport>) -> LinkConfig {
    let boot_id = backoff::random_bytes();
    LinkConfig {
        transport,
        boot_id,
        agent_version: format!("reddog-guest {}", env!("CARGO_PKG_VERSION")),
        reconnect_initial: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(2),
        seed: u64::from_le_bytes([
            boot_id[0], boot_id[1], boot_id[2], boot_id[3], boot_id[4], boot_id[5], boot_id[6],
            boot_id[7],
        ]),
    }
}

fn agent_mode(opts: &cmdline::Options, notes: Vec<String>) -> ! {
    say("mode agent");
    let wait = Duration::from_secs(opts.wait_secs);
    let mut boot_notes: Vec<(LogLevel, String)> =
        notes.into_iter().map(|n| (LogLevel::Warn, n)).collect();
    let booted = match pid1::mount_and_switch(wait) {
        Ok(b) => {
            boot_notes.extend(b.warnings.iter().map(|w| (LogLevel::Warn, w.clone())));
            Some(b)
        }
        Err(e) => {
            let text = format!("boot failed, staying in the initramfs: {e}");
            say(&text);
            boot_notes.push((LogLevel::Error, text));
            None
        }
    };
    if let Err(e) = sys::loopback_up() {
        say(&format!("loopback: {e}"));
    }
    guest_agent::power_button::spawn_watcher(wait);
    let role_dir = Path::new(pid1::ROLE_MOUNT);
    // The network first, so the role starts with it. A bad instance file is
    // reported by the supervisor when it loads the role.
    if let Ok(Some(inst)) = instance::load_instance(&role_dir.join(instance::INSTANCE_FILE)) {
        if let Some(net) = inst.net {
            match guest_agent::netconf::configure("eth0", &net, wait) {
                Ok(()) => say(&format!(
                    "eth0 {}/{} via {} mtu {}",
                    net.address, net.prefix_len, net.gateway, net.mtu
                )),
                Err(e) => {
                    let text = format!("eth0: {e}");
                    say(&text);
                    boot_notes.push((LogLevel::Error, text));
                }
            }
        }
    }
    let cfg = AgentConfig {
        link: link_config(Arc::new(transport::Vsock {
            port: opts.agent_port,
        })),
        manifest: role_dir.join(manifest::MANIFEST_FILE),
        instance: role_dir.join(instance::INSTANCE_FILE),
        passwd: PathBuf::from("/etc/passwd"),
        pid1: true,
        tick: Duration::from_millis(50),
        outbox: OutboxLimits::default(),
        boot_notes,
    };
    say(&format!("agent: host at vsock port {}", opts.agent_port));
    let report = supervisor::run(cfg, Arc::new(Mutex::new(Status::default())));
    say(&format!(
        "shutdown: role {:?}, killed={}, {} ms of {} ms",
        report.role_exit,
        report.killed,
        report.elapsed.as_millis(),
        report.deadline_ms
    ));
    pid1::power_off(booted.as_ref())
}

fn probe_mode(opts: &cmdline::Options) -> ! {
    let wait = Duration::from_secs(opts.wait_secs);
    let disks = probe::find_disks(opts.disks, wait);
    for d in &disks {
        let dev = Path::new("/dev").join(&d.name);
        let first = probe::first_bytes(&dev, 32).unwrap_or_else(|e| format!("<read failed: {e}>"));
        say(&format!(
            "disk {} serial={} sectors={} first={first}",
            d.name, d.serial, d.sectors
        ));
    }
    for serial in &opts.write_test {
        match disks.iter().find(|d| &d.serial == serial) {
            Some(d) => match probe::try_write(&Path::new("/dev").join(&d.name)) {
                Ok(()) => say(&format!("write-test {serial} ok")),
                Err(e) => say(&format!("write-test {serial} refused: {e}")),
            },
            None => say(&format!("write-test {serial} no-such-disk")),
        }
    }
    if let Some(port) = opts.vsock_connect {
        match probe::vsock_hello(port, wait) {
            Ok(reply) => say(&format!("vsock-connect port={port} reply={reply:?}")),
            Err(e) => say(&format!("vsock-connect port={port} failed: {e}")),
        }
    }
    if let Some(port) = opts.vsock_listen {
        say(&format!("vsock-listen port={port} waiting"));
        match probe::vsock_serve_one(port, wait) {
            Ok(line) => say(&format!("vsock-listen port={port} got={line:?}")),
            Err(e) => say(&format!("vsock-listen port={port} failed: {e}")),
        }
    }
    pid1::power_off(None)
}

/// Not PID 1: the agent as an ordinary process, for development.
fn host_main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket = None;
    let mut role_dir = PathBuf::from("/role");
    let mut passwd = PathBuf::from("/etc/passwd");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--host-socket" => socket = Some(PathBuf::from(value())),
            "--role-dir" => role_dir = PathBuf::from(value()),
            "--passwd" => passwd = PathBuf::from(value()),
            _ => {
                eprintln!("usage: reddog-guest --host-socket PATH [--role-dir DIR] [--passwd FILE] (as PID 1 it reads the kernel command line)");
                std::process::exit(2);
            }
        }
    }
    let Some(path) = socket else {
        eprintln!("reddog-guest: not PID 1; give --host-socket PATH to run the agent against a unix socket");
        std::process::exit(2);
    };
    let cfg = AgentConfig {
        link: link_config(Arc::new(transport::Unix { path })),
        manifest: role_dir.join(manifest::MANIFEST_FILE),
        instance: role_dir.join(instance::INSTANCE_FILE),
        passwd,
        pid1: false,
        tick: Duration::from_millis(50),
        outbox: OutboxLimits::default(),
        boot_notes: Vec::new(),
    };
    let report = supervisor::run(cfg, Arc::new(Mutex::new(Status::default())));
    say(&format!("shutdown: {report:?}"));
}
