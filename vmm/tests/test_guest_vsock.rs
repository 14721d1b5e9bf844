//! End to end over virtio-vsock on this host's KVM: the tiny test guest's agent
//! (`vsock=` on its command line) connects to the host port 1024 through
//! reddog-vmm's hybrid vsock (the unix socket `<uds>_1024`), and a host-side
//! listener here speaks the guest protocol to it with the `guest-proto` crate.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{require_kvm, vmm, Cmdline, HbMode, Run};
use guest_proto::{
    encode_raw_frame, Capabilities, Decoded, Frame, GuestMsg, Heartbeat, HelloAck, HostMsg, Ping,
    ProtoError, SetHeartbeatInterval, Shutdown, StreamDecoder, MAX_FRAME_LEN,
};
use vmm_api::platform::mmio;
use vmm_api::ExitReason;

/// The start of the agent's first console line for a vsock device at `w`.
fn agent_hello(w: mmio::Window) -> String {
    format!("vsock base={:#x} irq={}", w.addr, w.gsi)
}

/// The vsock window with `disks` disks in front.
fn vsock_window(disks: u32) -> mmio::Window {
    mmio::vsock_window(disks).expect("in the layout")
}
const PORT: u32 = 1024;
/// How long the host side waits for anything before the test fails.
const WAIT: Duration = Duration::from_secs(15);

/// How to boot the VM.
struct Setup {
    /// Command line after `exit=acpi` (`vsock=` and `smp=` included).
    cmdline: Cmdline,
    /// The VMM's wall-clock limit.
    timeout_ms: u64,
    /// A 1 MiB raw disk, attached before the vsock device.
    disk: bool,
    vcpus: u8,
    /// Bind the agent's host port before the VM starts (else on the first accept).
    listen_now: bool,
}

impl Setup {
    /// The vsock device alone, one vCPU, `agent_opts` for the agent.
    fn new(agent_opts: Cmdline, timeout_ms: u64) -> Self {
        Self {
            cmdline: Cmdline::new()
                .no_smp()
                .vsock_for_disks(0)
                .extend(&agent_opts),
            timeout_ms,
            disk: false,
            vcpus: 1,
            listen_now: true,
        }
    }
}

/// A VM running the test guest with a vsock device, and the host listener
/// its agent connects to.
struct Vm {
    dir: tempfile::TempDir,
    listener: Option<UnixListener>,
    vmm: Option<JoinHandle<Run>>,
}

impl Vm {
    /// Boots the guest with `agent_opts`; the VMM stops it after `timeout_ms`.
    fn start(agent_opts: Cmdline, timeout_ms: u64) -> Self {
        Self::start_with(Setup::new(agent_opts, timeout_ms))
    }

    fn start_with(setup: Setup) -> Self {
        require_kvm();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut vm = Self {
            dir,
            listener: None,
            vmm: None,
        };
        if setup.listen_now {
            vm.listen();
        }
        let kernel = test_guest::elf_path()
            .to_str()
            .expect("utf-8 path")
            .to_string();
        let mut args = vec![
            "--kernel".to_string(),
            kernel,
            "--cmdline".to_string(),
            Cmdline::new()
                .exit_acpi()
                .extend(&setup.cmdline)
                .to_string(),
            "--vsock".to_string(),
            format!("cid=3,uds={}", vm.uds().display()),
            "--timeout-ms".to_string(),
            setup.timeout_ms.to_string(),
            "--vcpus".to_string(),
            setup.vcpus.to_string(),
        ];
        if setup.disk {
            let img = vm.dir.path().join("disk.img");
            std::fs::write(&img, vec![0u8; 1 << 20]).expect("disk image");
            args.push("--disk".to_string());
            args.push(format!("path={},format=raw", img.display()));
        }
        vm.vmm = Some(std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            vmm(&args)
        }));
        vm
    }

    /// The VMM's vsock socket; the agent's host port is `<uds>_1024`.
    fn uds(&self) -> PathBuf {
        self.dir.path().join("vm.sock")
    }

    /// Binds the agent's host port.
    fn listen(&mut self) {
        let listener = UnixListener::bind(format!("{}_{PORT}", self.uds().display()))
            .expect("bind the agent's host port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        self.listener = Some(listener);
    }

    /// Waits for the VMM to exit.
    fn wait(&mut self) -> Run {
        self.vmm
            .take()
            .expect("the VMM was already waited for")
            .join()
            .expect("VMM thread")
    }

    /// Accepts the agent's next connection.
    fn accept(&mut self) -> Conn {
        if self.listener.is_none() {
            self.listen();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.listener.as_ref().map(UnixListener::accept) {
                Some(Ok((stream, _))) => return Conn::new(stream),
                Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => {
                    if self.vmm.as_ref().is_some_and(|h| h.is_finished()) {
                        let run = self.wait();
                        panic!(
                            "the VM ended before its agent connected: {}",
                            run.describe()
                        );
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the agent did not connect within {WAIT:?}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => panic!("accept: {other:?}"),
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Do not leave a VMM behind a failed assertion: it has its own limit,
        // so waiting for it is bounded.
        if let Some(h) = self.vmm.take() {
            let _ = h.join();
        }
    }
}

/// What the host read from the guest.
#[derive(Debug)]
enum Got {
    Hello {
        header_version: u8,
        min_version: u8,
        max_version: u8,
        boot_id: [u8; 16],
        capabilities: Capabilities,
        agent_version: String,
    },
    Heartbeat(Heartbeat),
    Ready,
    Pong(u64),
    /// Any other frame, described for failure messages.
    Other(#[allow(dead_code)] String),
    /// The decoder rejected the bytes.
    Error(ProtoError),
    /// The guest (or the VMM) closed the connection.
    Eof,
    /// Nothing arrived in time.
    Timeout,
}

/// One connection from the agent, with a streaming decoder.
struct Conn {
    stream: UnixStream,
    dec: StreamDecoder,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        stream.set_nonblocking(false).expect("blocking stream");
        Self {
            stream,
            dec: StreamDecoder::new(),
        }
    }

    fn send(&mut self, msg: HostMsg) {
        let mut out = [0u8; MAX_FRAME_LEN];
        let n = msg.encode(1, &mut out).expect("encode");
        self.send_bytes(&out[..n]);
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream
            .set_write_timeout(Some(WAIT))
            .expect("write timeout");
        self.stream.write_all(bytes).expect("send to the guest");
    }

    /// Skips heartbeats and Ready until a Pong; returns its nonce.
    fn pong(&mut self) -> u64 {
        loop {
            match self.next(WAIT) {
                Got::Pong(n) => return n,
                Got::Heartbeat(_) | Got::Ready => {}
                other => panic!("expected Pong, got {other:?}"),
            }
        }
    }

    /// The next frame (or error, or end) within `limit`.
    fn next(&mut self, limit: Duration) -> Got {
        let deadline = Instant::now() + limit;
        loop {
            match self.dec.next_frame::<GuestMsg>() {
                Decoded::Frame { frame, .. } => {
                    let header_version = frame.version();
                    return match frame {
                        Frame::Known { msg, .. } => match msg {
                            GuestMsg::Hello(h) => Got::Hello {
                                header_version,
                                min_version: h.min_version,
                                max_version: h.max_version,
                                boot_id: h.boot_id,
                                capabilities: h.capabilities,
                                agent_version: h.agent_version.to_string(),
                            },
                            GuestMsg::Heartbeat(hb) => Got::Heartbeat(hb),
                            GuestMsg::Ready => Got::Ready,
                            GuestMsg::Pong(p) => Got::Pong(p.nonce),
                            other => Got::Other(format!("{other:?}")),
                        },
                        Frame::Unknown { kind, .. } => Got::Other(format!("unknown kind {kind}")),
                    };
                }
                Decoded::Error { error, .. } => return Got::Error(error),
                Decoded::NeedMore { .. } => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Timeout;
            }
            self.stream
                .set_read_timeout(Some(left))
                .expect("read timeout");
            let spare = self.dec.spare_mut();
            match self.stream.read(spare) {
                Ok(0) => return Got::Eof,
                Ok(n) => self.dec.commit(n),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Got::Timeout
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Got::Eof,
                Err(e) => panic!("read from the guest: {e}"),
            }
        }
    }

    /// Expects Hello and answers it with HelloAck(1, interval_ms); returns the boot id.
    fn handshake(&mut self, interval_ms: u32) -> [u8; 16] {
        let got = self.next(WAIT);
        let Got::Hello {
            header_version,
            min_version,
            max_version,
            boot_id,
            capabilities,
            agent_version,
        } = got
        else {
            panic!("expected Hello first, got {got:?}");
        };
        assert_eq!((header_version, min_version, max_version), (1, 1, 1));
        assert!(capabilities.contains(Capabilities::HEARTBEAT_INTERVAL | Capabilities::SHUTDOWN));
        assert!(!capabilities.contains(Capabilities::ROLE));
        assert_eq!(agent_version, "test-guest/1");
        self.send(HostMsg::HelloAck(HelloAck {
            version: 1,
            heartbeat_interval_ms: interval_ms,
        }));
        boot_id
    }

    /// The next heartbeat, skipping Ready; panics on anything else.
    fn heartbeat(&mut self) -> Heartbeat {
        loop {
            match self.next(WAIT) {
                Got::Heartbeat(hb) => return hb,
                Got::Ready => {}
                other => panic!("expected a heartbeat, got {other:?}"),
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn agent_says_hello_beats_answers_ping_and_shuts_down() {
    let boot_id = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ];
    let mut vm = Vm::start(Cmdline::new().boot_id(boot_id), 20_000);
    let mut conn = vm.accept();
    assert_eq!(hex(&conn.handshake(100)), hex(&boot_id));

    // The first heartbeat comes at once, then one every 100 ms; Ready after the first.
    let started = Instant::now();
    let mut beats = Vec::new();
    let mut ready = false;
    while beats.len() < 3 {
        match conn.next(WAIT) {
            Got::Heartbeat(hb) => beats.push(hb),
            Got::Ready => {
                assert_eq!(beats.len(), 1, "Ready follows the first heartbeat");
                ready = true;
            }
            other => panic!("expected heartbeats, got {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(ready, "no Ready frame");
    for (i, hb) in beats.iter().enumerate() {
        assert_eq!(hb.seq, i as u64);
        assert_eq!(hb.load_avg_x100, [0; 3]);
        assert_eq!(hb.role_restarts, 0);
        assert!(hb.free_mem_kib > 100 * 1024, "{hb:?}");
    }
    assert_eq!(beats[0].role_state, guest_proto::RoleState::Running);
    assert_eq!(beats[2].role_state, guest_proto::RoleState::Ready);
    // The guest's clock (kvmclock) and its timer agree with ours.
    let guest_ms = beats[2].uptime_ms - beats[0].uptime_ms;
    assert!((195..2_000).contains(&guest_ms), "{beats:?}");
    assert!(
        took >= Duration::from_millis(180),
        "3 heartbeats 100 ms apart took {took:?}"
    );

    // Ping -> Pong (heartbeats may come in between).
    let nonce = 0x0123_4567_89ab_cdef;
    conn.send(HostMsg::Ping(Ping { nonce }));
    loop {
        match conn.next(WAIT) {
            Got::Pong(n) => {
                assert_eq!(n, nonce);
                break;
            }
            Got::Heartbeat(_) => {}
            other => panic!("expected Pong, got {other:?}"),
        }
    }

    // A new interval is obeyed (the first heartbeat after the change may have
    // been on its way already).
    conn.send(HostMsg::SetHeartbeatInterval(SetHeartbeatInterval {
        interval_ms: 200,
    }));
    let hb = [conn.heartbeat(), conn.heartbeat(), conn.heartbeat()];
    assert_eq!((hb[1].seq, hb[2].seq), (hb[0].seq + 1, hb[0].seq + 2));
    let gap = hb[2].uptime_ms - hb[1].uptime_ms;
    assert!((195..2_000).contains(&gap), "{hb:?}");

    conn.send(HostMsg::Shutdown(Shutdown { deadline_ms: 5_000 }));
    let run = vm.wait();
    assert_eq!(run.status, 0, "{}", run.describe());
    assert_eq!(
        run.report.as_ref().map(|r| r.reason),
        Some(ExitReason::PowerOff)
    );
    let agent = run.lines("agent");
    for want in [
        "connected port=1024",
        "hello-ack version=1 interval=100",
        "heartbeat seq=0",
        "ready",
        &format!("ping nonce={nonce}"),
        "interval ms=200",
        "shutdown",
    ] {
        assert!(
            agent.contains(&want),
            "no `agent: {want}`: {}",
            run.describe()
        );
    }
    assert!(
        agent[0].starts_with(&format!(
            "{} cid=3 port=1024 mode=normal",
            agent_hello(vsock_window(0))
        )),
        "{}",
        run.describe()
    );
    assert!(agent[0].ends_with(&format!("boot_id={}", hex(&boot_id))));
    assert_eq!(run.line("exit"), Some("acpi"), "{}", run.describe());
}

#[test]
fn silent_agent_says_hello_then_nothing() {
    let mut vm = Vm::start(Cmdline::new().hb_mode(HbMode::Silent), 1_500);
    let mut conn = vm.accept();
    conn.handshake(100);
    conn.send(HostMsg::Ping(Ping { nonce: 7 }));
    // Nothing more until the VMM's limit ends the VM (and the connection).
    let got = conn.next(WAIT);
    assert!(matches!(got, Got::Eof), "expected silence, got {got:?}");
    let run = vm.wait();
    assert_eq!(
        run.status,
        ExitReason::Timeout.exit_code(),
        "{}",
        run.describe()
    );
    let agent = run.lines("agent");
    assert!(agent.contains(&"hello-ack version=1 interval=100"));
    assert!(agent.contains(&"ping nonce=7"));
    assert!(
        !agent.iter().any(|l| l.starts_with("heartbeat")),
        "{}",
        run.describe()
    );
}

#[test]
fn crashing_agent_triple_faults_after_its_heartbeats() {
    let mut vm = Vm::start(Cmdline::new().hb_mode(HbMode::Crash).crash_after(3), 20_000);
    let mut conn = vm.accept();
    conn.handshake(100);
    for seq in 0..3 {
        assert_eq!(conn.heartbeat().seq, seq);
    }
    let got = conn.next(WAIT);
    assert!(matches!(got, Got::Eof), "expected the end, got {got:?}");
    let run = vm.wait();
    assert_eq!(
        run.status,
        ExitReason::TripleFault.exit_code(),
        "{}",
        run.describe()
    );
    assert!(run.lines("agent").contains(&"crash after 3 heartbeats"));
}

#[test]
fn garbage_agent_is_caught_by_the_decoder_and_reconnects() {
    let mut vm = Vm::start(Cmdline::new().hb_mode(HbMode::Garbage), 20_000);
    let mut boot_ids = Vec::new();
    // Bad magic first, then an oversized length; the host closes after each
    // framing error (as on vsock), the guest comes back with Hello.
    for _ in 0..2 {
        let mut conn = vm.accept();
        boot_ids.push(conn.handshake(100));
        let got = conn.next(WAIT);
        match got {
            Got::Error(e) => assert!(e.is_framing_error(), "{e:?}"),
            other => panic!("expected a decoding error, got {other:?}"),
        }
    }
    assert_eq!(boot_ids[0], boot_ids[1], "same boot, same boot id");
    // The guest is still alive and obeys Shutdown.
    let mut conn = vm.accept();
    conn.handshake(100);
    conn.send(HostMsg::Shutdown(Shutdown { deadline_ms: 0 }));
    let run = vm.wait();
    assert_eq!(run.status, 0, "{}", run.describe());
    let agent = run.lines("agent");
    assert!(agent.contains(&"garbage n=0") && agent.contains(&"garbage n=1"));
    assert!(
        agent
            .iter()
            .filter(|l| l.starts_with("reset by host"))
            .count()
            >= 2
    );
    assert!(agent.contains(&"shutdown"));
}

#[test]
fn flooding_agent_sends_as_fast_as_it_can() {
    let mut vm = Vm::start(Cmdline::new().hb_mode(HbMode::Flood), 20_000);
    let mut conn = vm.accept();
    conn.handshake(1_000);
    // Far more than one heartbeat per interval, in order, none lost.
    let started = Instant::now();
    let mut expected = 0;
    while expected < 300 {
        let hb = conn.heartbeat();
        assert_eq!(hb.seq, expected);
        expected += 1;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "300 heartbeats took {:?}",
        started.elapsed()
    );
    conn.send(HostMsg::Shutdown(Shutdown { deadline_ms: 0 }));
    let run = vm.wait();
    assert_eq!(run.status, 0, "{}", run.describe());
}

#[test]
fn bad_agent_options_and_a_wrong_device_fail_cleanly() {
    require_kvm();
    let k = test_guest::elf_path().to_str().expect("utf-8 path");
    // Nothing at the window, or options that do not parse: the guest says so
    // and leaves as usual.
    let first = || Cmdline::new().vsock_for_disks(0);
    for (opts, want) in [
        (first(), "error vsock-magic"),
        (
            first().opt("hb_mode", "nonsense"),
            "error bad-option hb_mode",
        ),
        (Cmdline::new().vsock_at(0x1234), "error bad-option vsock"),
        (first().agent_port(0), "error bad-option agent_port"),
        (first().opt("boot_id", "00"), "error bad-option boot_id"),
        // Past the last window reddog-vmm can place (its line would be the GED's).
        (Cmdline::new().vsock_at(mmio::END), "error vsock-address"),
        (
            Cmdline::new().vsock_at(mmio::BASE - mmio::WINDOW_SIZE),
            "error vsock-address",
        ),
    ] {
        let cmdline = Cmdline::new()
            .exit_acpi()
            .no_smp()
            .extend(&opts)
            .to_string();
        let run = vmm(&[
            "--kernel",
            k,
            "--cmdline",
            &cmdline,
            "--timeout-ms",
            "20000",
        ]);
        assert_eq!(run.status, 0, "{}", run.describe());
        assert_eq!(run.lines("agent"), vec![want], "{}", run.describe());
        assert_eq!(run.line("exit"), Some("acpi"));
    }
}

#[test]
fn vsock_behind_a_disk_uses_the_second_window_and_its_interrupt() {
    // Disks come first: the disk has the first window (GSI 5), vsock the second (GSI 6).
    let mut setup = Setup::new(Cmdline::new(), 20_000);
    setup.disk = true;
    let mut vm = Vm::start_with(setup);
    let run = vm.wait();
    assert_eq!(run.status, 0, "{}", run.describe());
    assert_eq!(run.lines("agent"), vec!["error vsock-device-id"]);

    let mut setup = Setup::new(Cmdline::new(), 20_000);
    setup.disk = true;
    setup.cmdline = Cmdline::new().no_smp().vsock_for_disks(1);
    let mut vm = Vm::start_with(setup);
    let mut conn = vm.accept();
    conn.handshake(100);
    // Ping/Pong needs the device interrupt (GSI 6) or at worst the timer.
    conn.send(HostMsg::Ping(Ping { nonce: 42 }));
    loop {
        match conn.next(WAIT) {
            Got::Pong(n) => {
                assert_eq!(n, 42);
                break;
            }
            Got::Heartbeat(_) | Got::Ready => {}
            other => panic!("expected Pong, got {other:?}"),
        }
    }
    conn.send(HostMsg::Shutdown(Shutdown { deadline_ms: 0 }));
    let run = vm.wait();
    assert_eq!(run.status, 0, "{}", run.describe());
    let hello = format!("{} cid=3", agent_hello(vsock_window(1)));
    assert!(
        run.lines("agent")[0].starts_with(&hello),
        "{}",
        run.describe()
    );
}

#[test]
fn unknown_host_kinds_are_skipped_and_receive_credit_flows() {
    let mut vm = Vm::start(Cmdline::new(), 20_000);
    let mut conn = vm.accept();
    conn.handshake(60_000);
    // More than the 64 KiB of credit the guest gives: it must consume and
    // send credit updates. Kinds 0x86.. are a newer host's: skipped whole.
    let payload = [0xa5u8; 1000];
    let mut frame = [0u8; MAX_FRAME_LEN];
    let n = encode_raw_frame(1, 0x86, &payload, &mut frame).expect("encode");
    let mut burst = Vec::new();
    for _ in 0..80 {
        burst.extend_from_slice(&frame[..n]);
    }
    conn.send_bytes(&burst);
    // Still in step: the Ping right after them is answered.
    conn.send(HostMsg::Ping(Ping { nonce: 99 }));
    assert_eq!(conn.pong(), 99);
    conn.send(HostMsg::Shutdown(Shutdown { deadline_ms: 0 }));
    let run = vm.wait();
    assert_eq!(run.status, 0, "{}", run.describe());
    let skipped = run
        .lines("agent")
        .iter()
        .filter(|l| **l == "skipped kind=0x86")
        .count();
    assert_eq!(
        skipped,
        10,
        "reported 10 times, then quiet: {}",
        run.describe()
    );
}

#[test]
fn agent_retries_until_the_host_listens() {
    // Nothing listens at first: the VMM answers the agent's REQUEST with RST.
    let mut setup = Setup::new(Cmdline::new(), 20_000);
    setup.listen_now = false;
    let mut vm = Vm::start_with(setup);
    std::thread::sleep(Duration::from_millis(1_000));
    let mut conn = vm.accept();
    conn.handshake(100);
    conn.send(HostMsg::Shutdown(Shutdown { deadline_ms: 0 }));
    let run = vm.wait();
    assert_eq!(run.status, 0, "{}", run.describe());
    let agent = run.lines("agent");
    assert!(
        agent.contains(&"refused port=1024 retry_ms=100"),
        "{}",
        run.describe()
    );
    assert!(agent.contains(&"connected port=1024"));
}

#[test]
fn fallback_clock_and_several_vcpus() {
    // The TSC calibrated against the APIC timer instead of kvmclock; the APs
    // started (and halted) by the guest's SMP bring-up do not get in the way.
    let mut setup = Setup::new(Cmdline::new(), 20_000);
    setup.cmdline = Cmdline::new().vsock_for_disks(0).agent_clock_tsc();
    setup.vcpus = 2;
    let mut vm = Vm::start_with(setup);
    let mut conn = vm.accept();
    conn.handshake(100);
    let started = Instant::now();
    let first = conn.heartbeat();
    let mut last = first;
    for _ in 0..3 {
        let hb = conn.heartbeat();
        assert_eq!(hb.seq, last.seq + 1);
        last = hb;
    }
    let took = started.elapsed();
    assert!(
        (295..3_000).contains(&(last.uptime_ms - first.uptime_ms)),
        "{first:?} {last:?}"
    );
    assert!(
        took >= Duration::from_millis(250),
        "3 intervals took {took:?}"
    );
    conn.send(HostMsg::Shutdown(Shutdown { deadline_ms: 0 }));
    let run = vm.wait();
    assert_eq!(run.status, 0, "{}", run.describe());
    assert_eq!(run.line("cpus"), Some("madt=2 online=2"));
    assert!(
        run.lines("agent")[0].contains(" clock=tsc khz="),
        "{}",
        run.describe()
    );
}
