//! virtio-net end to end on this host's KVM: the tiny test guest echoes every
//! frame it receives (`net=`, MACs swapped) through reddog-vmm's virtio-net
//! device, attached to a TAP by an inherited fd.
//!
//! Everything stays inside a network namespace the test creates (a thread
//! that `unshare(CLONE_NEWNET)`s, creates the TAP and an `AF_PACKET` socket
//! bound to it, then ends; the descriptors keep the namespace alive and it
//! goes with them). No frame reaches the host's interfaces.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_kvm, Cmdline};
use testkit::tap_netns::TapNetns;
use vmm_api::{Client, NetMetrics};

const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xaa];
/// IEEE 802 local experimental ethertype: nothing else in the namespace uses it.
const ETHERTYPE: u16 = 0x88b5;
/// The fd number the VMM finds its TAP on.
const TAP_FD: RawFd = 10;
const MTU: u16 = 1500;
const WAIT: Duration = Duration::from_secs(20);

fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u32 ^ seq) as u8);
    }
    f
}

fn echo_of(f: &[u8]) -> Vec<u8> {
    let mut e = f.to_vec();
    e[..6].copy_from_slice(&f[6..12]);
    e[6..12].copy_from_slice(&f[..6]);
    e
}

struct Vm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Vm {
    fn start(net: &TapNetns, cmdline: Cmdline) -> Self {
        Self::start_with(net, cmdline, &format!("fd={TAP_FD}"))
    }

    fn start_with(net: &TapNetns, cmdline: Cmdline, tap: &str) -> Self {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_reddog-vmm"));
        cmd.arg("--kernel")
            .arg(test_guest::elf_path())
            .arg("--cmdline")
            .arg(
                Cmdline::new()
                    .exit_acpi()
                    .no_smp()
                    .extend(&cmdline)
                    .to_string(),
            )
            .arg("--net")
            .arg(format!("{tap},mac=02:00:00:00:00:01,mtu={MTU}"))
            .arg("--serial")
            .arg(&serial)
            .arg("--api-sock")
            .arg(dir.path().join("api.sock"))
            .args(["--timeout-ms", "60000"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = if tap.starts_with("fd=") {
            net.pass_tap(&mut cmd, TAP_FD);
            cmd.spawn()
        } else {
            net.spawn_in(&mut cmd)
        }
        .expect("spawn reddog-vmm");
        Self { child, dir }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default()
    }

    fn wait_for_line(&mut self, needle: &str) -> String {
        let t = Instant::now();
        loop {
            let s = self.serial();
            if let Some(l) = s.lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("reddog-vmm exited ({st}) before {needle:?}; serial:\n{s}");
            }
            assert!(
                t.elapsed() < WAIT,
                "no {needle:?} on the console; serial:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn metrics(&self) -> NetMetrics {
        let mut c = Client::connect(self.dir.path().join("api.sock")).expect("connect");
        let m = c.metrics().expect("metrics");
        assert_eq!(m.net.len(), 1, "{m:?}");
        m.net[0]
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_guest_echoes_frames_and_oversize_ones_are_dropped_and_counted() {
    let net = TapNetns::new(ETHERTYPE, Duration::from_millis(200))
        .expect("a network namespace with a TAP (run as root)");
    let mut vm = Vm::start(
        &net,
        Cmdline::new().net_echo_for(0, false, 0).net_oversize(),
    );
    let ready = vm.wait_for_line("net: echo");
    assert!(ready.contains("mac=02:00:00:00:00:01 mtu=1500"), "{ready}");

    // Frames from the smallest Ethernet frame to the MTU, one at a time.
    let sizes = [60usize, 64, 128, 511, 1000, 1514];
    let mut buf = vec![0u8; 65536];
    let mut sent = 0u64;
    let mut bytes = 0u64;
    for seq in 0..60u32 {
        let f = frame(seq, sizes[seq as usize % sizes.len()]);
        net.send(&f).expect("send");
        sent += 1;
        bytes += f.len() as u64;
        let t = Instant::now();
        let got = loop {
            let n = net.recv(&mut buf).unwrap_or(0);
            if n > 0 {
                break buf[..n].to_vec();
            }
            assert!(
                t.elapsed() < WAIT,
                "no echo of frame {seq}; serial:\n{}",
                vm.serial()
            );
        };
        assert_eq!(got, echo_of(&f), "echo of frame {seq}");
    }
    // A burst: every frame comes back, none twice.
    let burst: Vec<Vec<u8>> = (1000..1200u32)
        .map(|s| frame(s, 200 + (s as usize % 1300)))
        .collect();
    for f in &burst {
        net.send(f).expect("send");
        sent += 1;
        bytes += f.len() as u64;
    }
    let mut seen = std::collections::HashSet::new();
    let t = Instant::now();
    while seen.len() < burst.len() && t.elapsed() < WAIT {
        if let Some(n) = net.recv(&mut buf) {
            let seq = u32::from_be_bytes(buf[14..18].try_into().unwrap());
            let i = (seq - 1000) as usize;
            assert_eq!(buf[..n], echo_of(&burst[i])[..], "echo of frame {seq}");
            assert!(seen.insert(seq), "frame {seq} came back twice");
        }
    }
    assert_eq!(seen.len(), burst.len(), "echoes of the burst");

    let m = vm.metrics();
    // The guest's one oversize frame was dropped and counted; ours all passed.
    assert_eq!(m.tx_dropped, 1, "{m:?}");
    assert!(m.rx_frames >= sent && m.tx_frames >= sent, "{m:?}");
    assert!(m.rx_bytes >= bytes && m.tx_bytes >= bytes, "{m:?}");
    assert_eq!(m.rx_dropped, 0, "{m:?}");
}

#[test]
fn a_tap_opened_by_name_echoes_too() {
    let net = TapNetns::new_persistent(ETHERTYPE, Duration::from_millis(200))
        .expect("a network namespace with a TAP (run as root)");
    let mut vm = Vm::start_with(
        &net,
        Cmdline::new().net_echo_for(0, false, 0),
        "tap=rdgtap0",
    );
    vm.wait_for_line("net: echo");
    let mut buf = vec![0u8; 65536];
    for seq in 0..10u32 {
        let f = frame(seq, 100);
        net.send(&f).expect("send");
        let t = Instant::now();
        let got = loop {
            if let Some(n) = net.recv(&mut buf) {
                break buf[..n].to_vec();
            }
            assert!(
                t.elapsed() < WAIT,
                "no echo of frame {seq}; serial:\n{}",
                vm.serial()
            );
        };
        assert_eq!(got, echo_of(&f), "echo of frame {seq}");
    }
    let m = vm.metrics();
    assert_eq!(
        (m.rx_frames, m.tx_frames, m.tx_dropped),
        (10, 10, 0),
        "{m:?}"
    );
}

#[test]
fn a_descriptor_that_is_not_a_tap_is_refused() {
    require_kvm();
    let f = std::fs::File::open("/dev/null").unwrap();
    let fd = f.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reddog-vmm"));
    cmd.arg("--kernel")
        .arg(test_guest::elf_path())
        .arg("--net")
        .arg(format!("fd={TAP_FD},mac=02:00:00:00:00:01"))
        .args(["--timeout-ms", "5000"]);
    // SAFETY: dup2 is async-signal-safe; it gives the child /dev/null at TAP_FD.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, TAP_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("is not a TAP opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"),
        "{err}"
    );
}
