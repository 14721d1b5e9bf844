//! `reddog-guest` as PID 1: bring the platform up, run the checks the kernel
//! command line asks for, report on the console, power off.

use std::path::Path;
use std::time::Duration;

use guest_agent::{cmdline, probe, probe::say, sys};

/// Where the initramfs lists its modules, in load order.
const MODULE_LIST: &str = "/etc/reddog/modules";

fn main() {
    probe::mount_kernel_filesystems();
    probe::mark_boot_timer();
    say(&format!("init pid={}", std::process::id()));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (opts, notes) = cmdline::parse(&cmdline);
    for n in notes {
        say(&n);
    }
    probe::load_modules(Path::new(MODULE_LIST));

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
    say("poweroff");
    let e = sys::power_off();
    say(&format!("poweroff failed: {e}"));
    // PID 1 must not exit: the kernel would panic.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
