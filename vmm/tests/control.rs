//! The control socket (`--api-sock`) on this host's KVM with the tiny test guest:
//! ping and info, pause and resume (the vCPU really stops), forced shutdown,
//! bad input, the wall-clock limit while paused, several clients.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_kvm, Cmdline, Exit};
use vmm_api::control::{
    Client, ClientError, ErrorKind, Event, Op, ServerMessage, ShutdownMode, ShutdownReply,
    StateReply, VmState, MAX_CLIENTS, MAX_LINE_LEN, PROTOCOL_VERSION,
};
use vmm_api::{ExitReason, ExitReport};

const TIMEOUT: Duration = Duration::from_secs(20);

/// `exit=hang`: the guest reports, then halts for good.
fn hang() -> Cmdline {
    Cmdline::new().exit(Exit::Hang)
}

/// A running `reddog-vmm` with a control socket.
struct Vm {
    child: Child,
    sock: PathBuf,
    report: PathBuf,
    _dir: tempfile::TempDir,
}

/// How a VM ended.
struct Ended {
    status: i32,
    stderr: String,
    report: Option<ExitReport>,
}

impl Vm {
    fn start(cmdline: &Cmdline, extra: &[&str]) -> Self {
        require_kvm();
        let cmdline = cmdline.to_string();
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("api.sock");
        let report = dir.path().join("report.json");
        let child = Command::new(env!("CARGO_BIN_EXE_reddog-vmm"))
            .args(["--kernel", test_guest::elf_path().to_str().expect("utf-8")])
            .args(["--cmdline", &cmdline, "--serial", "null"])
            .arg("--api-sock")
            .arg(&sock)
            .arg("--exit-report")
            .arg(&report)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn reddog-vmm");
        let vm = Self {
            child,
            sock,
            report,
            _dir: dir,
        };
        let deadline = Instant::now() + TIMEOUT;
        while UnixStream::connect(&vm.sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "the control socket never came up"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        vm
    }

    fn client(&self) -> Client {
        let c = Client::connect(&self.sock).expect("connect");
        c.set_timeout(Some(TIMEOUT)).expect("timeout");
        c
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time of the VMM process, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 (utime, stime) are the 12th and 13th after the comm.
        f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
    }

    fn wait(mut self) -> Ended {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("reddog-vmm did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let report = std::fs::read_to_string(&self.report)
            .ok()
            .and_then(|s| serde_json::from_str(s.trim()).ok());
        assert!(
            !self.sock.exists(),
            "the socket file is removed at exit: {stderr}"
        );
        Ended {
            status: status.code().unwrap_or(-1),
            stderr,
            report,
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A failed test must not leave a VM spinning.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn force_stop(vm: Vm) -> Ended {
    // Clients that just left may still hold their slots for a moment: a busy
    // answer is retried until the deadline.
    let deadline = Instant::now() + TIMEOUT;
    let r: ShutdownReply = loop {
        let mut c = vm.client();
        match c.call(Op::Shutdown {
            mode: ShutdownMode::Force,
        }) {
            Err(ClientError::Api(e)) if e.kind == ErrorKind::Busy => {
                assert!(Instant::now() < deadline, "no client slot freed up");
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other.expect("shutdown"),
        }
    };
    assert_eq!(r.mode, ShutdownMode::Force);
    let ended = vm.wait();
    assert_eq!(ended.status, 17, "{}", ended.stderr);
    ended
}

/// The next event that is not the boot timer (which may come at any time
/// early on, and twice if it raced with the subscription).
fn next_state_event(c: &mut Client) -> Event {
    loop {
        match c.next_event().expect("event") {
            Event::BootTimer { .. } => continue,
            e => return e,
        }
    }
}

fn api_error(r: Result<serde_json::Value, ClientError>) -> vmm_api::ApiError {
    match r {
        Err(ClientError::Api(e)) => e,
        other => panic!("expected an error response, got {other:?}"),
    }
}

#[test]
fn ping_info_metrics_and_a_forced_shutdown() {
    let vm = Vm::start(&hang(), &["--vcpus", "2", "--memory-mib", "64"]);
    let mut c = vm.client();
    assert_eq!(c.ping().expect("ping").version, PROTOCOL_VERSION);

    // The guest boots within moments; wait for its boot-timer write.
    let deadline = Instant::now() + TIMEOUT;
    let info = loop {
        let info = c.info().expect("info");
        if info.boot_time_us.is_some() {
            break info;
        }
        assert!(Instant::now() < deadline, "no boot time: {info:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(info.version, PROTOCOL_VERSION);
    assert_eq!(info.pid, vm.pid());
    assert_eq!(info.state, VmState::Running);
    assert_eq!((info.vcpus, info.memory_mib), (2, 64));
    assert_eq!(info.config.cmdline, hang().to_string());
    assert_eq!(info.config.api_sock.as_deref(), Some(vm.sock.as_path()));
    let first_run = info.first_run_us.expect("first KVM_RUN");
    let boot = info.boot_time_us.expect("boot time");
    assert!(first_run <= boot && boot <= info.uptime_us, "{info:?}");

    // The guest printed its report on COM1 (port I/O, bytes out).
    let deadline = Instant::now() + TIMEOUT;
    let m = loop {
        let m = c.metrics().expect("metrics");
        if m.serial_bytes_out > 0 {
            break m;
        }
        assert!(Instant::now() < deadline, "no serial output: {m:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(m.pio_exits > 0, "{m:?}");
    assert_eq!(m.pio_exits, m.exits.io_in + m.exits.io_out);
    assert_eq!(m.mmio_exits, m.exits.mmio_read + m.exits.mmio_write);
    assert_eq!(m.boot_time_us, Some(boot));
    assert_eq!(m.pauses, 0);

    let ended = force_stop(vm);
    let report = ended.report.expect("exit report");
    assert_eq!(report.reason, ExitReason::Requested);
    assert_eq!(report.exit_code, 17);
    assert!(report.detail.contains("control socket"), "{report:?}");
}

/// The names of the threads of process `pid` (`/proc/<pid>/task/*/comm`).
fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim_end().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn each_vcpu_thread_is_named_with_its_index() {
    let vm = Vm::start(&hang(), &["--vcpus", "3"]);
    let names = thread_names(vm.pid());
    let vcpus: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| n.starts_with("vcpu"))
        .collect();
    assert_eq!(vcpus, ["vcpu0", "vcpu1", "vcpu2"], "threads: {names:?}");
    force_stop(vm);
}

#[test]
fn pause_stops_the_vcpu_and_resume_restarts_it() {
    let vm = Vm::start(&Cmdline::new().exit(Exit::Spin).no_smp(), &["--vcpus", "2"]);
    let mut watcher = vm.client();
    let sub = watcher.subscribe().expect("subscribe");
    assert_eq!(sub.state, VmState::Running);
    let mut c = vm.client();

    // Spinning: the process burns CPU.
    std::thread::sleep(Duration::from_millis(200));
    let t0 = vm.cpu_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let running = vm.cpu_ticks() - t0;
    assert!(running >= 5, "a spinning guest uses CPU: {running} ticks");

    let r: StateReply = c.call(Op::Pause).expect("pause");
    assert_eq!(r.state, VmState::Paused);
    assert_eq!(next_state_event(&mut watcher), Event::Paused);
    assert_eq!(c.info().expect("info").state, VmState::Paused);
    let e = api_error(c.call(Op::Pause));
    assert_eq!(e.kind, ErrorKind::InvalidState, "{e:?}");

    // Paused: (almost) no CPU time at all.
    let t1 = vm.cpu_ticks();
    std::thread::sleep(Duration::from_millis(700));
    let paused = vm.cpu_ticks() - t1;
    assert!(
        paused <= 2,
        "a paused VM must not run: {paused} ticks in 700 ms (running: {running} in 500 ms)"
    );

    let r: StateReply = c.call(Op::Resume).expect("resume");
    assert_eq!(r.state, VmState::Running);
    assert_eq!(next_state_event(&mut watcher), Event::Resumed);
    let e = api_error(c.call(Op::Resume));
    assert_eq!(e.kind, ErrorKind::InvalidState, "{e:?}");

    let t2 = vm.cpu_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let resumed = vm.cpu_ticks() - t2;
    assert!(resumed >= 5, "a resumed guest runs again: {resumed} ticks");

    let m = c.metrics().expect("metrics");
    assert_eq!(m.pauses, 1);
    assert!(
        m.exits.interrupted >= 1,
        "the kick interrupted KVM_RUN: {m:?}"
    );

    // Pause and resume quickly, many times: every pause completes.
    for _ in 0..20 {
        let _: StateReply = c.call(Op::Pause).expect("pause");
        let _: StateReply = c.call(Op::Resume).expect("resume");
    }
    assert_eq!(c.metrics().expect("metrics").pauses, 21);

    // A forced shutdown of a paused VM works too, and subscribers hear why.
    let _: StateReply = c.call(Op::Pause).expect("pause");
    let ended = force_stop(vm);
    let mut events = Vec::new();
    while let Ok(e) = watcher.next_event() {
        events.push(e);
    }
    assert_eq!(
        events.last(),
        Some(&Event::Stopping {
            reason: ExitReason::Requested,
            exit_code: 17,
            detail: "shutdown (force) requested on the control socket".into()
        }),
        "{events:?}"
    );
    assert_eq!(ended.report.expect("report").reason, ExitReason::Requested);
}

#[test]
fn the_wall_clock_limit_ends_a_paused_vm() {
    let vm = Vm::start(&hang(), &["--timeout-ms", "1500", "--vcpus", "2"]);
    let mut watcher = vm.client();
    watcher.subscribe().expect("subscribe");
    let mut c = vm.client();
    let _: StateReply = c.call(Op::Pause).expect("pause");
    assert_eq!(next_state_event(&mut watcher), Event::Paused);
    let ended = vm.wait();
    assert_eq!(ended.status, 16, "{}", ended.stderr);
    match next_state_event(&mut watcher) {
        Event::Stopping {
            reason, exit_code, ..
        } => {
            assert_eq!((reason, exit_code), (ExitReason::Timeout, 16));
        }
        other => panic!("expected stopping, got {other:?}"),
    }
    assert!(matches!(watcher.next_event(), Err(ClientError::Closed)));
}

/// Sends `line` on a fresh connection and returns what came back and whether
/// the VMM then closed the connection.
fn exchange(sock: &Path, line: &[u8]) -> (Option<ServerMessage>, bool) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(line).expect("write");
    let mut r = BufReader::new(s);
    let mut first = Vec::new();
    r.read_until(b'\n', &mut first).expect("read");
    let msg = vmm_api::control::decode_server_line(&first).ok();
    // A ping after it tells whether the connection is still served.
    let _ = r.get_mut().write_all(b"{\"id\":99,\"op\":\"ping\"}\n");
    let mut next = Vec::new();
    let closed = matches!(r.read_until(b'\n', &mut next), Ok(0) | Err(_));
    (msg, closed)
}

fn expect_bad_request(msg: Option<ServerMessage>, id: Option<u64>) {
    match msg {
        Some(ServerMessage::Response(r)) => {
            assert_eq!(r.id, id, "{r:?}");
            let e = r.outcome.expect_err("an error");
            assert_eq!(e.kind, ErrorKind::BadRequest, "{e:?}");
        }
        other => panic!("expected a bad_request response, got {other:?}"),
    }
}

#[test]
fn bad_requests_get_errors_and_do_not_hurt_the_vmm() {
    let vm = Vm::start(&hang().no_smp(), &[]);

    // Not JSON: an error, then the connection is closed.
    let (msg, closed) = exchange(&vm.sock, b"this is not json\n");
    expect_bad_request(msg, None);
    assert!(closed);
    // Too long: likewise.
    let mut long = vec![b' '; MAX_LINE_LEN + 100];
    long.push(b'\n');
    let (msg, closed) = exchange(&vm.sock, &long);
    expect_bad_request(msg, None);
    assert!(closed);
    // JSON but not a request: an error with the id, and the connection stays.
    for line in [
        &b"{\"id\":5,\"op\":\"reboot\"}\n"[..],
        b"{\"id\":5,\"op\":\"shutdown\"}\n",
        b"{\"id\":5,\"op\":\"shutdown\",\"mode\":\"gently\"}\n",
        b"{\"id\":5,\"op\":\"ping\",\"extra\":true}\n",
    ] {
        let (msg, closed) = exchange(&vm.sock, line);
        expect_bad_request(msg, Some(5));
        assert!(!closed, "{}", String::from_utf8_lossy(line));
    }
    let (msg, _) = exchange(&vm.sock, b"{\"op\":\"ping\"}\n");
    expect_bad_request(msg, None);

    // Random bytes and random JSON-ish lines.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // No op that changes the VM's state: the guest must keep running.
    let pieces = [
        "{", "}", "\"id\"", ":", "1", ",", "\"op\"", "\"ping\"", "[", "null",
    ];
    for i in 0..60 {
        let mut line: Vec<u8> = if i % 2 == 0 {
            (0..next() % 100)
                .map(|_| (next() as u8) | 1)
                .filter(|&b| b != b'\n')
                .collect()
        } else {
            (0..next() % 12)
                .flat_map(|_| pieces[(next() % pieces.len() as u64) as usize].bytes())
                .collect()
        };
        line.push(b'\n');
        let (msg, _) = exchange(&vm.sock, &line);
        match msg {
            Some(ServerMessage::Response(r)) => assert!(r.outcome.is_err() || r.id.is_some()),
            other => panic!("{:?} -> {other:?}", String::from_utf8_lossy(&line)),
        }
    }

    // The VMM is fine and the guest still running.
    let mut c = vm.client();
    assert_eq!(c.ping().expect("ping").version, PROTOCOL_VERSION);
    assert_eq!(c.info().expect("info").state, VmState::Running);
    force_stop(vm);
}

#[test]
fn several_clients_at_once_and_a_cap() {
    let vm = Vm::start(&hang().no_smp(), &[]);
    let mut a = vm.client();
    let mut b = vm.client();
    // Subscribed early: the boot time is in the answer or comes as an event.
    let sub = a.subscribe().expect("subscribe");
    let boot = match sub.boot_time_us {
        Some(us) => us,
        None => match a.next_event().expect("event") {
            Event::BootTimer { us } => us,
            other => panic!("expected the boot timer, got {other:?}"),
        },
    };
    assert_eq!(b.info().expect("info").boot_time_us, Some(boot));
    b.ping().expect("ping b");
    a.ping().expect("ping a");
    let _: StateReply = b.call(Op::Pause).expect("pause");
    assert_eq!(next_state_event(&mut a), Event::Paused);
    let _: StateReply = b.call(Op::Resume).expect("resume");
    assert_eq!(next_state_event(&mut a), Event::Resumed);

    // Two threads hammering at once.
    let sock = vm.sock.clone();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock).expect("connect");
                c.set_timeout(Some(TIMEOUT)).expect("timeout");
                for _ in 0..50 {
                    c.ping().expect("ping");
                    c.metrics().expect("metrics");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }

    // `a` and `b` are two; fill up to the cap, then one more is turned away.
    // (The workers' slots free up as the VMM sees them close: retry `busy`.)
    let mut more: Vec<Client> = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while more.len() < MAX_CLIENTS - 2 {
        let mut c = vm.client();
        match c.ping() {
            Ok(_) => more.push(c),
            Err(ClientError::Api(e)) if e.kind == ErrorKind::Busy => {
                assert!(Instant::now() < deadline, "slots never freed");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("ping within the cap: {e}"),
        }
    }
    let mut extra = vm.client();
    match extra.ping() {
        Err(ClientError::Api(e)) => assert_eq!(e.kind, ErrorKind::Busy),
        other => panic!("expected busy, got {other:?}"),
    }
    // A slot frees up when a client leaves.
    drop(more.pop());
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut c = vm.client();
        if c.ping().is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(more);
    force_stop(vm);
}

#[test]
fn acpi_shutdown_presses_the_power_button() {
    // The test guest has no ACPI interpreter: it ignores the button, so the VM
    // keeps running (Linux's evged + button driver turn it into KEY_POWER).
    let vm = Vm::start(&hang().no_smp(), &[]);
    let mut c = vm.client();
    let r: ShutdownReply = c
        .call(Op::Shutdown {
            mode: ShutdownMode::Acpi,
        })
        .expect("acpi shutdown");
    assert_eq!(r.mode, ShutdownMode::Acpi);
    let m = c.metrics().expect("metrics");
    assert_eq!(m.power_button_presses, 1);
    assert_eq!(c.info().expect("info").state, VmState::Running);
    force_stop(vm);
}

#[test]
fn socket_paths_stale_live_and_wrong() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let k = test_guest::elf_path().to_str().expect("utf-8");
    let acpi = Cmdline::new().exit_acpi().no_smp().to_string();
    let hang = hang().no_smp().to_string();

    // A stale socket (its listener gone) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let run = common::vmm(&[
        "--kernel",
        k,
        "--cmdline",
        &acpi,
        "--serial",
        "null",
        "--api-sock",
        stale.to_str().expect("utf-8"),
    ]);
    assert_eq!(run.status, 0, "{}", run.describe());
    assert!(!stale.exists(), "removed at exit");

    // A live listener is not taken over.
    let live = dir.path().join("live.sock");
    let _listener = UnixListener::bind(&live).expect("bind");
    let run = common::vmm(&[
        "--kernel",
        k,
        "--cmdline",
        &hang,
        "--api-sock",
        live.to_str().expect("utf-8"),
        "--timeout-ms",
        "10000",
    ]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(run.stderr.contains("in use"), "{}", run.describe());
    assert!(live.exists());

    // Nor is a file that is not a socket.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").expect("write");
    let run = common::vmm(&[
        "--kernel",
        k,
        "--cmdline",
        &hang,
        "--api-sock",
        file.to_str().expect("utf-8"),
        "--timeout-ms",
        "10000",
    ]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(run.stderr.contains("not a socket"), "{}", run.describe());
    assert_eq!(std::fs::read(&file).expect("read"), b"keep me");

    // Too long for a unix socket address: a config error before any KVM work.
    let long = format!("/tmp/{}", "x".repeat(200));
    let run = common::vmm(&["--kernel", k, "--api-sock", &long]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(run.stderr.contains("api_sock"), "{}", run.describe());
}

/// `--wait-for-boot`: the VM is built but its guest starts only on `boot`, so
/// a subscriber sees every event from the first instruction on.
#[test]
fn a_vm_held_for_boot_starts_on_request_only() {
    let vm = Vm::start(&hang(), &["--wait-for-boot"]);
    let mut c = vm.client();
    let info = c.info().expect("info");
    assert_eq!(info.state, VmState::Created);
    assert!(info.config.boot_on_request);
    // Held: the guest has not run, so no boot timer and no first run.
    std::thread::sleep(Duration::from_millis(100));
    let info = c.info().expect("info");
    assert_eq!((info.boot_time_us, info.first_run_us), (None, None));
    assert_eq!(c.metrics().expect("metrics").exits.total(), 0);
    // Pause, resume and the power button make no sense before boot.
    for op in [
        Op::Pause,
        Op::Resume,
        Op::Shutdown {
            mode: ShutdownMode::Acpi,
        },
    ] {
        let e = api_error(c.call(op));
        assert_eq!(e.kind, ErrorKind::InvalidState, "{op:?}: {e:?}");
        assert!(e.message.contains("boot"), "{e:?}");
    }
    let mut events = vm.client();
    let sub = events.subscribe().expect("subscribe");
    assert_eq!((sub.state, sub.boot_time_us), (VmState::Created, None));
    let r: StateReply = c.call(Op::Boot).expect("boot");
    assert_eq!(r.state, VmState::Running);
    // The boot timer now arrives as an event, after the boot.
    match events.next_event().expect("event") {
        Event::BootTimer { us } => {
            let first = c.info().expect("info").first_run_us.expect("ran");
            assert!(us >= first, "boot timer {us} before the first run {first}");
        }
        e => panic!("expected the boot timer, got {e:?}"),
    }
    assert_eq!(c.info().expect("info").state, VmState::Running);
    let e = api_error(c.call(Op::Boot));
    assert_eq!(e.kind, ErrorKind::InvalidState);
    // A VM built without it is booted already.
    drop((c, events));
    force_stop(vm);
    let vm = Vm::start(&hang(), &[]);
    let e = api_error(vm.client().call(Op::Boot));
    assert_eq!(e.kind, ErrorKind::InvalidState);
    force_stop(vm);
}

#[test]
fn wait_for_boot_needs_a_control_socket() {
    let out = Command::new(env!("CARGO_BIN_EXE_reddog-vmm"))
        .args(["--kernel", test_guest::elf_path().to_str().expect("utf-8")])
        .arg("--wait-for-boot")
        .output()
        .expect("run reddog-vmm");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-sock"), "{err}");
}
