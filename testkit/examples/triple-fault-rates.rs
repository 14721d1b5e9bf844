//! Triple-fault rates of the demo's guest under reddog-vmm and under QEMU/KVM
//! as the inner VMM, in the same nested outer machine (`docs/testing.md`,
//! "Triple faults in the nested machine").
//!
//! Each outer machine (QEMU TCG, emulated AMD SVM, real `kvm-amd` inside)
//! boots the demo's guest — Debian's cloud kernel, the guest initramfs, a
//! qcow2 overlay over the cached base image, ext4 resource and role disks, the
//! web role, vsock to a host listener — `--rounds` times per combination,
//! interleaved: reddog-vmm with 1 vCPU, QEMU with 1, reddog-vmm with 2, QEMU
//! with 2. Every guest gets a fresh overlay and resource disk, sends
//! `--heartbeats` heartbeats after ready (one a second) and is then shut down
//! by the listener (~`heartbeats` + 6 s of guest time). A boot ends as
//!
//! - `ok`: the role got ready, the shutdown came, the VM powered off (status 0);
//! - `triple-fault`: reddog-vmm's report says `TripleFault`; for QEMU, its trace
//!   of `kvm_run_exit` shows `KVM_EXIT_SHUTDOWN` (reason 8) — with
//!   `-no-reboot` QEMU then exits instead of resetting;
//! - `other`: anything else (the detail says what).
//!
//! `cargo run -p testkit --example triple-fault-rates -- [--rounds R] [--machines M] [--heartbeats K] [--only reddog|qemu] [--vcpus 1|2] [--label L]`
//!
//! Each outer machine must stay under ~8 min: with the defaults (R = 4, 10
//! heartbeats) one holds 16 boots and takes ~6-7 min. The logs of every boot
//! that was not `ok` are written under `<target dir>/triple-fault-rates/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use testkit::nested::{self, OuterMachine};

type Sections = BTreeMap<String, String>;
use testkit::os_image;
use vmm_api::{ExitReason, ExitReport};

const WEB_PORT: u16 = 8080;
/// What the agent gives the demo's guests (`agent/src/process.rs`).
const CMDLINE: &str = "console=ttyS0 reboot=acpi panic=-1 quiet reddog.agent_port=1024";
/// The QEMU firmware a microvm with `-kernel` reads.
const QEMU_FIRMWARE: &[&str] = &["bios-microvm.bin", "pvh.bin", "linuxboot_dma.bin"];
/// The inner VMM's limit per boot (both VMMs).
const BOOT_LIMIT_SECS: u64 = 60;

const SCENARIO: &str = r#"set -u
cmdline="$(cat /guest/cmdline)"
beats=$(cat /guest/heartbeats)
n=0
for spec in $(cat /guest/plan); do
  n=$((n+1))
  vmm=${spec%:*}; vcpus=${spec#*:}
  d=/tmp/r; rm -rf $d /tmp/vm.sock /tmp/vm.sock_1024; mkdir -p $d
  cp /guest/os.qcow2 $d/os.qcow2; cp /guest/resource.img $d/resource.img
  ln -s /guest/base.img $d/base.img
  if [ "$vmm" = reddog ]; then sock=/tmp/vm.sock_1024; else sock=vsock:1024; fi
  /bin/guest-listener $sock --interval-ms 1000 --shutdown-after $beats --deadline-ms 5000 > $d/listener 2>&1 &
  lp=$!
  sleep 0.2
  t0=$(cut -d' ' -f1 /proc/uptime)
  if [ "$vmm" = reddog ]; then
    /bin/reddog-vmm --kernel /guest/vmlinux --initrd /guest/initrd --cmdline "$cmdline" \
      --vcpus $vcpus --memory-mib 256 --timeout-ms BOOT_LIMIT_MS \
      --disk path=$d/os.qcow2,format=qcow2,backing=/guest/base.img,backing_format=raw,serial=reddog-os \
      --disk path=$d/resource.img,format=raw,serial=reddog-resource \
      --disk path=/guest/role.img,format=raw,ro,serial=reddog-role \
      --vsock cid=3,uds=/tmp/vm.sock \
      --serial $d/console --exit-report $d/report.json 2> $d/vmm.log
    rc=$?
  else
    /bin/qemu-system-x86_64 -M microvm -accel kvm -cpu host -smp $vcpus -m 256 \
      -nodefaults -no-user-config -display none -monitor none -no-reboot -L /usr/share/qemu \
      -serial file:$d/console -kernel /guest/vmlinux -initrd /guest/initrd -append "$cmdline" \
      -drive id=os,file=$d/os.qcow2,format=qcow2,if=none -device virtio-blk-device,drive=os,serial=reddog-os \
      -drive id=res,file=$d/resource.img,format=raw,if=none -device virtio-blk-device,drive=res,serial=reddog-resource \
      -drive id=role,file=/guest/role.img,format=raw,if=none,readonly=on -device virtio-blk-device,drive=role,serial=reddog-role \
      -device vhost-vsock-device,guest-cid=3 \
      -trace kvm_run_exit -D $d/qemu.trace > $d/vmm.log 2>&1 &
    qp=$!
    ( sleep BOOT_LIMIT_SECS; kill $qp 2>/dev/null && echo "killed at the limit" >> $d/vmm.log ) &
    wp=$!
    wait $qp
    rc=$?
    kill $wp 2>/dev/null
    grep -c 'reason 8$' $d/qemu.trace > $d/shutdown-exits
    tail -n 12 $d/qemu.trace > $d/last-exits
    rm -f $d/qemu.trace
  fi
  t1=$(cut -d' ' -f1 /proc/uptime)
  sleep 0.3
  kill $lp 2>/dev/null
  wait $lp 2>/dev/null
  echo $rc > $d/status
  echo "$t0 $t1" > $d/times
  # Straight to the console, so the boots before an outer crash still count.
  for f in console report.json vmm.log listener status times shutdown-exits last-exits; do
    [ -f $d/$f ] && { echo "REDDOG-BEGIN run$n.$f"; cat $d/$f; echo; echo "REDDOG-END run$n.$f"; } > /dev/console
  done
  echo "REDDOG-RUN $n $vmm $vcpus rc=$rc" > /dev/console
done
exit 0
"#;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Vmm {
    Reddog,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Self::Reddog => "reddog",
            Self::Qemu => "qemu",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
enum Outcome {
    Ok,
    TripleFault(String),
    Other(String),
}

struct Opts {
    rounds: u32,
    machines: u32,
    heartbeats: u32,
    only: Option<Vmm>,
    vcpus: Option<u8>,
    label: String,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        rounds: 4,
        machines: 1,
        heartbeats: 10,
        only: None,
        vcpus: None,
        label: "m".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().ok_or(format!("{a} needs a value"))?;
        let num = || {
            v.parse::<u32>()
                .map_err(|_| format!("{a}: not a number: {v}"))
        };
        match a.as_str() {
            "--rounds" => o.rounds = num()?.clamp(1, 50),
            "--machines" => o.machines = num()?.clamp(1, 20),
            "--heartbeats" => o.heartbeats = num()?.clamp(1, 60),
            "--only" => {
                o.only = Some(match v.as_str() {
                    "reddog" => Vmm::Reddog,
                    "qemu" => Vmm::Qemu,
                    _ => return Err(format!("--only reddog|qemu, not {v}")),
                })
            }
            "--label" => o.label = v,
            "--vcpus" => o.vcpus = Some(num()?.clamp(1, 2) as u8),
            _ => return Err(format!("unknown option {a}")),
        }
    }
    Ok(o)
}

fn plan(o: &Opts) -> Vec<(Vmm, u8)> {
    let mut p = Vec::new();
    for _ in 0..o.rounds {
        for vcpus in [1u8, 2] {
            for vmm in [Vmm::Reddog, Vmm::Qemu] {
                if o.only.is_none_or(|x| x == vmm) && o.vcpus.is_none_or(|x| x == vcpus) {
                    p.push((vmm, vcpus));
                }
            }
        }
    }
    p
}

fn classify(vmm: Vmm, out: &Sections, n: usize) -> Outcome {
    let sec = |name: &str| {
        out.get(&format!("run{n}.{name}"))
            .map_or("", String::as_str)
    };
    let status: Option<i32> = sec("status").trim().parse().ok();
    let listener = sec("listener");
    let console = sec("console");
    let shutdown_sent = listener.contains("sent shutdown");
    let ready = listener.contains(" ready");
    let powered_off = console.contains("reddog-guest: poweroff");
    let times: Vec<f64> = sec("times")
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    let secs = match times.as_slice() {
        [a, b] => b - a,
        _ => 0.0,
    };
    let phase = format!(
        "after {secs:.1} s, role {}, shutdown {}",
        if ready { "ready" } else { "not ready" },
        if shutdown_sent { "sent" } else { "not sent" }
    );
    match vmm {
        Vmm::Reddog => {
            let report: Option<ExitReport> = serde_json::from_str(sec("report.json").trim()).ok();
            match report {
                Some(r) if r.reason == ExitReason::TripleFault => {
                    Outcome::TripleFault(format!("{phase}; {}", r.detail))
                }
                Some(r)
                    if r.reason == ExitReason::PowerOff && status == Some(0) && shutdown_sent =>
                {
                    Outcome::Ok
                }
                Some(r) => Outcome::Other(format!("{phase}; {:?}: {}", r.reason, r.detail)),
                None => Outcome::Other(format!("{phase}; no exit report, status {status:?}")),
            }
        }
        Vmm::Qemu => {
            let shutdowns: u32 = sec("shutdown-exits").trim().parse().unwrap_or(0);
            if shutdowns > 0 {
                Outcome::TripleFault(format!(
                    "{phase}; {shutdowns} KVM_EXIT_SHUTDOWN in QEMU's trace"
                ))
            } else if status == Some(0) && shutdown_sent && powered_off {
                Outcome::Ok
            } else {
                Outcome::Other(format!(
                    "{phase}; QEMU status {status:?}, guest poweroff {}: {}",
                    if powered_off { "seen" } else { "not seen" },
                    sec("vmm.log").lines().last().unwrap_or("")
                ))
            }
        }
    }
}

fn logs_dir() -> PathBuf {
    let ws = testkit::artifacts::workspace_root();
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map(|d| ws.join(d))
        .unwrap_or_else(|| ws.join("target"))
        .join("triple-fault-rates")
}

struct Guest {
    kernel: testkit::KernelArtifacts,
    files: Vec<(String, PathBuf)>,
    listener: PathBuf,
    _work: tempfile::TempDir,
}

fn prepare() -> Result<Guest, String> {
    let e = |what: &'static str| move |err: &dyn std::fmt::Display| format!("{what}: {err}");
    let kernel = testkit::debian_kernel().map_err(|x| e("Debian's cloud kernel")(&x))?;
    let (initrd, _) = testkit::guest::initramfs(&kernel).map_err(|x| e("guest initramfs")(&x))?;
    let base = os_image::base_image().map_err(|x| e("OS base image")(&x))?;
    let work = tempfile::tempdir().map_err(|x| e("temporary directory")(&x))?;
    let w = work.path();
    let overlay = w.join("os.qcow2");
    os_image::os_overlay(&base, "base.img", &overlay).map_err(|x| e("qcow2 overlay")(&x))?;
    let role_dir = w.join("role");
    std::fs::create_dir(&role_dir).map_err(|x| e("role directory")(&x))?;
    os_image::web_role(&role_dir, WEB_PORT, "<h1>reddog web role</h1>\n")
        .map_err(|x| e("web role")(&x))?;
    os_image::role_disk(&role_dir, &w.join("role.img")).map_err(|x| e("role disk")(&x))?;
    os_image::resource_disk(&w.join("resource.img"), 64 << 20)
        .map_err(|x| e("resource disk")(&x))?;
    std::fs::write(w.join("initrd"), initrd).map_err(|x| e("initrd")(&x))?;
    let listener = testkit::artifacts::static_bin("testkit", "guest-listener")
        .map_err(|x| e("guest-listener")(&x))?;
    let vmlinux = kernel
        .pvh_vmlinux()
        .map_err(|x| e("vmlinux")(&x))?
        .to_path_buf();
    let files = vec![
        ("vmlinux".into(), vmlinux),
        ("initrd".into(), w.join("initrd")),
        ("base.img".into(), base),
        ("os.qcow2".into(), overlay),
        ("resource.img".into(), w.join("resource.img")),
        ("role.img".into(), w.join("role.img")),
    ];
    Ok(Guest {
        kernel,
        files,
        listener,
        _work: work,
    })
}

fn outer_machine(
    g: &Guest,
    plan: &[(Vmm, u8)],
    heartbeats: u32,
    console: Arc<Mutex<String>>,
) -> Result<OuterMachine, String> {
    let qemu = std::env::var_os("REDDOG_INNER_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"));
    if !qemu.is_file() {
        return Err(format!(
            "{} missing: install qemu-system-x86 (.ci/install-deps)",
            qemu.display()
        ));
    }
    let plan_text: Vec<String> = plan
        .iter()
        .map(|(v, c)| format!("{}:{c}", v.name()))
        .collect();
    let script = SCENARIO
        .replace("BOOT_LIMIT_MS", &(BOOT_LIMIT_SECS * 1000).to_string())
        .replace("BOOT_LIMIT_SECS", &BOOT_LIMIT_SECS.to_string());
    // Outer boot ~15 s, each guest at most its limit; the caller keeps a
    // machine's plan short enough to stay well under that.
    let limit = Duration::from_secs(60 + plan.len() as u64 * (BOOT_LIMIT_SECS + 5));
    let mut m = OuterMachine::new(&g.kernel)
        .modules(&["vhost_vsock"])
        .host_file("bin/guest-listener", 0o755, &g.listener)
        .host_program("bin/qemu-system-x86_64", &qemu)
        .file("guest/cmdline", 0o644, CMDLINE.as_bytes().to_vec())
        .file("guest/plan", 0o644, plan_text.join(" ").into_bytes())
        .file(
            "guest/heartbeats",
            0o644,
            heartbeats.to_string().into_bytes(),
        )
        .scenario(&script)
        .timeout(limit);
    for (name, path) in &g.files {
        m = m.host_file(&format!("guest/{name}"), 0o644, path);
    }
    let fw = Path::new("/usr/share/qemu");
    for f in QEMU_FIRMWARE {
        m = m.host_file(&format!("usr/share/qemu/{f}"), 0o644, &fw.join(f));
    }
    Ok(m.live_lines(move |line| {
        if let Some(at) = line.find("REDDOG-RUN ") {
            eprintln!("  {}", &line[at..]);
        }
        let mut c = console
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.push_str(line);
        c.push('\n');
    }))
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("triple-fault-rates: {e}");
            return ExitCode::from(2);
        }
    };
    let t0 = Instant::now();
    let g = match prepare() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("triple-fault-rates: {e}");
            return ExitCode::FAILURE;
        }
    };
    let plan = plan(&o);
    let logs = logs_dir();
    let _ = std::fs::create_dir_all(&logs);
    eprintln!(
        "artifacts ready in {:.1} s; {} outer machine(s) x {} boots, {} heartbeats after ready",
        t0.elapsed().as_secs_f64(),
        o.machines,
        plan.len(),
        o.heartbeats
    );
    // (vmm, vcpus) -> (boots, ok, triple faults, other)
    let mut counts: BTreeMap<(Vmm, u8), [u32; 4]> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut machine_errors = 0;
    let mut outer_failures: Vec<String> = Vec::new();
    for machine in 1..=o.machines {
        let console = Arc::new(Mutex::new(String::new()));
        let m = match outer_machine(&g, &plan, o.heartbeats, console.clone()) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("triple-fault-rates: {e}");
                return ExitCode::FAILURE;
            }
        };
        eprintln!("outer machine {machine}/{}", o.machines);
        let result = m.run();
        let text = console
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let (_, out) = nested::parse_console(&text);
        match result {
            Ok(r) => eprintln!("outer machine {machine}: {:.1} s", r.elapsed.as_secs_f64()),
            Err(e) => {
                // The outer machine itself failed (its kernel crashed, or it
                // ran out of time) during the first boot without a status.
                let during =
                    (1..=plan.len()).find(|n| !out.contains_key(&format!("run{n}.status")));
                let what = during.map_or("after the last boot".to_owned(), |n| {
                    let (vmm, vcpus) = plan[n - 1];
                    format!("during boot {n} ({} {vcpus} vCPU)", vmm.name())
                });
                let sign: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        l.contains("BUG:")
                            || l.contains("Kernel panic")
                            || l.contains("soft lockup")
                    })
                    .take(3)
                    .collect();
                eprintln!("outer machine {machine} failed {what}: {e}");
                machine_errors += 1;
                outer_failures.push(format!("machine {machine} {what}: {}", sign.join(" | ")));
                let dir = logs.join(format!("{}{machine}-outer", o.label));
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(dir.join("console"), &text);
                let _ = std::fs::write(dir.join("error"), e.to_string());
            }
        }
        for (i, &(vmm, vcpus)) in plan.iter().enumerate() {
            let n = i + 1;
            if !out.contains_key(&format!("run{n}.status")) {
                // The machine ended before this boot ended: not counted.
                continue;
            }
            let c = counts.entry((vmm, vcpus)).or_default();
            c[0] += 1;
            let outcome = classify(vmm, &out, n);
            let slot = match &outcome {
                Outcome::Ok => 1,
                Outcome::TripleFault(_) => 2,
                Outcome::Other(_) => 3,
            };
            c[slot] += 1;
            if outcome != Outcome::Ok {
                let dir = logs.join(format!(
                    "{}{machine}-run{n}-{}-{vcpus}cpu",
                    o.label,
                    vmm.name()
                ));
                let _ = std::fs::create_dir_all(&dir);
                let prefix = format!("run{n}.");
                for (name, text) in &out {
                    if let Some(f) = name.strip_prefix(&prefix) {
                        let _ = std::fs::write(dir.join(f), text);
                    }
                }
                eprintln!(
                    "  machine {machine} boot {n} ({} {vcpus} vCPU): {outcome:?}; logs {}",
                    vmm.name(),
                    dir.display()
                );
                failures.push((machine, n, vmm, vcpus, outcome));
            }
        }
    }
    println!("vmm     vcpus  boots  ok  triple-fault  other");
    let mut per_vmm: BTreeMap<Vmm, [u32; 4]> = BTreeMap::new();
    for ((vmm, vcpus), c) in &counts {
        println!(
            "{:<7} {vcpus:>5}  {:>5}  {:>2}  {:>12}  {:>5}",
            vmm.name(),
            c[0],
            c[1],
            c[2],
            c[3]
        );
        let t = per_vmm.entry(*vmm).or_default();
        for k in 0..4 {
            t[k] += c[k];
        }
    }
    for (vmm, t) in &per_vmm {
        println!(
            "{:<7} total  {:>5}  {:>2}  {:>12}  {:>5}",
            vmm.name(),
            t[0],
            t[1],
            t[2],
            t[3]
        );
    }
    for (machine, n, vmm, vcpus, outcome) in &failures {
        println!(
            "machine {machine} boot {n} {} {vcpus} vCPU: {outcome:?}",
            vmm.name()
        );
    }
    for f in &outer_failures {
        println!("outer machine failed: {f}");
    }
    println!(
        "outer machines that failed as a whole: {machine_errors}; whole run {:.1} s; logs of failed boots: {}",
        t0.elapsed().as_secs_f64(),
        logs.display()
    );
    // A failed outer machine is counted and reported beside the boots; the
    // tool itself fails only when no boot ended at all.
    if counts.values().map(|c| c[0]).sum::<u32>() == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
