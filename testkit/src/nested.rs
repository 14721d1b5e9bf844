//! Runs scenarios on real KVM (AMD SVM) inside a QEMU-TCG machine.
//!
//! This host's `/dev/kvm` is `kvm-pvm`, on which unmodified Linux cannot boot. So
//! the real-Linux tests boot Debian's cloud kernel as an *outer* machine under
//! QEMU's TCG emulator with an emulated AMD CPU (`-cpu max` has SVM), load
//! `irqbypass`, `kvm` and `kvm-amd` there, and run the static `reddog-vmm`
//! inside it.
//!
//! The outer initramfs holds busybox, the modules, `/bin/reddog-vmm`, the files a
//! scenario adds and `/scenario.sh`. Its `/init` runs the scenario with its
//! output in `/out/scenario.log`; scenarios write whatever they want reported
//! into `/out/<name>`. Afterwards `/init` prints every `/out` file between
//! `REDDOG-BEGIN <name>` and `REDDOG-END <name>` lines, one after the other, so
//! the VMM's log and the guest console never interleave, then
//! `NESTED-DONE rc=<scenario status>`, and powers off.
//!
//! QEMU's CPU is `max` without AVX/AVX2/MPX/PKU (TCG does not emulate them
//! usefully) and **without XSAVE**: with XSAVE, a Linux guest inside the outer
//! machine (under reddog-vmm and under QEMU/KVM alike) dies at its first signal
//! return ("bad frame in rt_sigreturn") on Debian 12's QEMU 7.2, so the nested
//! guests use FXSAVE instead. See `docs/testing.md`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_api::ExitReport;

use crate::artifacts::{self, ArtifactError, KernelArtifacts};
use crate::cpio::{CpioError, CpioWriter};

/// The QEMU CPU model of the outer machine (see the module documentation);
/// `REDDOG_NESTED_CPU` overrides it, e.g. to recheck XSAVE on a newer QEMU.
pub const OUTER_CPU: &str = "max,-avx,-avx2,-mpx,-pku,-xsave";
/// Outer machine memory.
pub const OUTER_MEMORY_MIB: u32 = 2048;
/// The modules the outer machine loads (with their dependencies, in order).
pub const KVM_MODULES: &[&str] = &["kvm-amd"];
/// Default hard wall-clock limit for one outer machine.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Serialises outer machines within a process.
static ONE_MACHINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

const DONE_MARKER: &str = "NESTED-DONE rc=";
const BEGIN_MARKER: &str = "REDDOG-BEGIN ";
const END_MARKER: &str = "REDDOG-END ";

#[derive(Debug, Error)]
pub enum NestedError {
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("building the initramfs: {0}")]
    Cpio(#[from] CpioError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start {qemu}: {source}. Install QEMU: apt-get install -y --allow-downgrades qemu-system-x86 qemu-utils/bookworm (see .ci/install-deps)")]
    NoQemu {
        qemu: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the outer machine ran past its {limit:?} limit and was killed; last console lines:\n{tail}")]
    Timeout { limit: Duration, tail: String },
    #[error("the outer machine stopped ({status}) without printing \"{DONE_MARKER}<n>\" (kernel panic or broken init?); last console lines:\n{tail}")]
    Incomplete { status: String, tail: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NestedError {
    let what = what.into();
    move |source| NestedError::Io { what, source }
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Parses "2596.140" (MHz) into kHz.
fn mhz_to_khz(s: &str) -> Option<u64> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let int: u64 = int.parse().ok()?;
    let frac3: String = frac.chars().chain("000".chars()).take(3).collect();
    let frac: u64 = frac3.parse().ok()?;
    Some(int * 1000 + frac)
}

/// This host's TSC frequency in kHz, for the outer kernel's `tsc_early_khz`
/// (without it the outer kernel sometimes hangs calibrating the TSC under TCG):
/// sysfs `tsc_freq_khz`, else the kernel log's TSC lines, else `cpu MHz` from
/// `/proc/cpuinfo` when the TSC is constant. `None` means "use `-M q35`".
pub fn host_tsc_khz() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(khz) = s.trim().parse() {
            return Some(khz);
        }
    }
    if let Ok(out) = Command::new("dmesg").stderr(Stdio::null()).output() {
        let log = String::from_utf8_lossy(&out.stdout);
        let find = |key: &str| {
            log.lines().rev().find_map(|l| {
                let rest = &l[l.find(key)? + key.len()..];
                mhz_to_khz(rest.split_whitespace().next()?)
            })
        };
        if let Some(k) =
            find("Refined TSC clocksource calibration:").or_else(|| find("tsc: Detected"))
        {
            return Some(k);
        }
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let constant = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "constant_tsc"));
    if !constant {
        return None;
    }
    info.lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| mhz_to_khz(l.split_once(':')?.1))
}

/// An initramfs whose `/init` is `script` run by the static busybox
/// (`/bin/busybox`, with `/bin/sh` linking to it), plus `/proc`, `/sys`, `/dev`
/// and `/tmp` mount points. The kernel's built-in initramfs supplies
/// `/dev/console`.
pub fn busybox_initramfs(script: &str) -> Result<Vec<u8>, NestedError> {
    let busybox_path = artifacts::busybox_static()?;
    let busybox = std::fs::read(&busybox_path).map_err(io(busybox_path.display().to_string()))?;
    let mut w = CpioWriter::new(Vec::new());
    w.file("bin/busybox", 0o755, &busybox)?;
    w.symlink("bin/sh", "busybox")?;
    for d in ["proc", "sys", "dev", "tmp"] {
        w.dir(d, 0o755)?;
    }
    let init = if script.starts_with("#!") {
        script.to_owned()
    } else {
        format!("#!/bin/busybox sh\n{script}")
    };
    w.file("init", 0o755, init.as_bytes())?;
    Ok(w.finish()?)
}

/// What the outer machine printed, split up.
#[derive(Debug, Clone)]
pub struct NestedReport {
    /// The scenario's exit status (`NESTED-DONE rc=<n>`).
    pub rc: i32,
    /// `/out/<name>` files as the outer init printed them.
    pub sections: BTreeMap<String, String>,
    /// The outer machine's whole console.
    pub console: String,
    /// Wall-clock time from starting QEMU to its exit.
    pub elapsed: Duration,
}

impl NestedReport {
    /// The contents of `/out/<name>`, if the scenario wrote it.
    pub fn section(&self, name: &str) -> Option<&str> {
        self.sections.get(name).map(String::as_str)
    }

    /// Everything, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "outer machine: scenario rc {}, {:.1} s\n--- outer console\n{}",
            self.rc,
            self.elapsed.as_secs_f64(),
            self.console
        )
    }
}

/// Splits the outer console into `REDDOG-BEGIN`/`REDDOG-END` sections and finds
/// the `NESTED-DONE` status.
pub fn parse_console(console: &str) -> (Option<i32>, BTreeMap<String, String>) {
    let mut sections = BTreeMap::new();
    let mut rc = None;
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in console.split('\n') {
        let line = line.trim_end_matches('\r');
        if let Some((name, lines)) = current.as_mut() {
            if line.strip_prefix(END_MARKER) == Some(name.as_str()) {
                let mut text = lines.join("\n");
                // The init adds one newline after each file.
                while text.ends_with('\n') {
                    text.pop();
                }
                if !text.is_empty() {
                    text.push('\n');
                }
                sections.insert(std::mem::take(name), text);
                current = None;
            } else {
                lines.push(line);
            }
            continue;
        }
        if let Some(name) = line.strip_prefix(BEGIN_MARKER) {
            current = Some((name.to_owned(), Vec::new()));
        } else if let Some(n) = line.strip_prefix(DONE_MARKER) {
            rc = n.trim().parse().ok();
        }
    }
    (rc, sections)
}

const OUTER_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /out
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo 1 > /proc/sys/kernel/printk
echo "REDDOG-OUTER-UP $(uname -r)"
for m in $(cat /lib/kvm/order); do
  insmod /lib/kvm/$m.ko || echo "REDDOG-INSMOD-FAILED $m"
done
if [ -c /dev/kvm ]; then
  sh /scenario.sh > /out/scenario.log 2>&1
  rc=$?
else
  echo "REDDOG-NO-KVM: /dev/kvm missing after loading the kvm modules" > /out/scenario.log
  rc=200
fi
for f in /out/*; do
  [ -f "$f" ] || continue
  n=${f#/out/}
  echo "REDDOG-BEGIN $n"
  cat "$f"
  echo
  echo "REDDOG-END $n"
done
echo "NESTED-DONE rc=$rc"
sync
poweroff -f
"#;

enum FileData {
    Bytes(Vec<u8>),
    Host(PathBuf),
    /// A dynamically linked host program: copied with the shared libraries
    /// `ldd` lists, each at its own path.
    Program(PathBuf),
}

/// Called with each line of the outer console as it arrives.
pub type LineSink = Box<dyn FnMut(&str) + Send>;

/// One QEMU-TCG outer machine with real KVM inside.
pub struct OuterMachine {
    kernel: KernelArtifacts,
    files: Vec<(String, u32, FileData)>,
    scenario: String,
    timeout: Duration,
    live: std::sync::Mutex<Option<LineSink>>,
    modules: Vec<String>,
}

impl OuterMachine {
    /// An outer machine booting `kernel` (and loading its KVM modules).
    pub fn new(kernel: &KernelArtifacts) -> Self {
        Self {
            kernel: kernel.clone(),
            files: Vec::new(),
            scenario: String::new(),
            timeout: DEFAULT_TIMEOUT,
            live: std::sync::Mutex::new(None),
            modules: Vec::new(),
        }
    }

    /// Puts `bytes` at `dest` in the outer machine.
    pub fn file(mut self, dest: &str, mode: u32, bytes: Vec<u8>) -> Self {
        self.files
            .push((dest.to_owned(), mode, FileData::Bytes(bytes)));
        self
    }

    /// Copies the host file `src` to `dest` in the outer machine.
    pub fn host_file(mut self, dest: &str, mode: u32, src: &Path) -> Self {
        self.files
            .push((dest.to_owned(), mode, FileData::Host(src.to_owned())));
        self
    }

    /// Copies the dynamically linked host program `src` to `dest`, with the
    /// shared libraries and loader `ldd` lists for it (at the same paths as on
    /// the host), e.g. `mkfs.ext4` for the agent's disks. The outer machine
    /// runs the host's own libraries, so this only works for programs of this
    /// host's architecture.
    pub fn host_program(mut self, dest: &str, src: &Path) -> Self {
        self.files
            .push((dest.to_owned(), 0o755, FileData::Program(src.to_owned())));
        self
    }

    /// Hands every line of the outer console to `sink` as it arrives (the
    /// scenario's own output goes to `/out/scenario.log`; it reaches the
    /// console live only when written to `/dev/console`). The whole console
    /// is still returned in the report.
    pub fn live_lines(self, sink: impl FnMut(&str) + Send + 'static) -> Self {
        *self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(sink));
        self
    }

    /// The shell script the outer init runs (busybox sh; `/bin/reddog-vmm` is
    /// there). Write results to `/out/<name>`.
    pub fn scenario(mut self, script: &str) -> Self {
        self.scenario = script.to_owned();
        self
    }

    /// Loads these kernel modules (with their dependencies) after the KVM
    /// ones, e.g. `vhost_vsock` for QEMU as the inner VMM.
    pub fn modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|n| (*n).to_owned()));
        self
    }

    /// The hard wall-clock limit after which QEMU is killed.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    fn initramfs(&self, path: &Path) -> Result<(), NestedError> {
        let busybox_path = artifacts::busybox_static()?;
        let busybox =
            std::fs::read(&busybox_path).map_err(io(busybox_path.display().to_string()))?;
        let vmm_path = artifacts::static_vmm()?;
        let vmm = std::fs::read(&vmm_path).map_err(io(vmm_path.display().to_string()))?;
        let mut wanted: Vec<&str> = KVM_MODULES.to_vec();
        wanted.extend(self.modules.iter().map(String::as_str));
        let modules = self.kernel.modules_with_deps(&wanted)?;

        let f = std::fs::File::create(path).map_err(io(path.display().to_string()))?;
        let mut w = CpioWriter::new(std::io::BufWriter::new(f));
        w.file("init", 0o755, OUTER_INIT.as_bytes())?;
        w.file("bin/busybox", 0o755, &busybox)?;
        w.symlink("bin/sh", "busybox")?;
        w.file("bin/reddog-vmm", 0o755, &vmm)?;
        let order: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        w.file(
            "lib/kvm/order",
            0o644,
            format!("{}\n", order.join("\n")).as_bytes(),
        )?;
        for m in &modules {
            w.file(&format!("lib/kvm/{}.ko", m.name), 0o644, &m.bytes)?;
        }
        w.file("scenario.sh", 0o755, self.scenario.as_bytes())?;
        let mut libs_written = std::collections::BTreeSet::new();
        for (dest, mode, data) in &self.files {
            match data {
                FileData::Bytes(b) => w.file(dest, *mode, b)?,
                FileData::Host(src) => {
                    let b = std::fs::read(src).map_err(io(src.display().to_string()))?;
                    w.file(dest, *mode, &b)?;
                }
                FileData::Program(src) => {
                    let b = std::fs::read(src).map_err(io(src.display().to_string()))?;
                    w.file(dest, *mode, &b)?;
                    for lib in artifacts::shared_libraries(src)? {
                        if !libs_written.insert(lib.clone()) {
                            continue;
                        }
                        let b = std::fs::read(&lib).map_err(io(lib.display().to_string()))?;
                        let rel = lib.to_string_lossy().trim_start_matches('/').to_owned();
                        w.file(&rel, 0o755, &b)?;
                    }
                }
            }
        }
        w.finish()?
            .flush()
            .map_err(io(path.display().to_string()))?;
        Ok(())
    }

    /// Builds the initramfs, boots the outer machine and waits (at most the
    /// limit) for it to power off. Outer machines of one process run one at a
    /// time: each keeps two host CPUs busy, and the limit should measure the
    /// machine, not the queue.
    ///
    /// One retry, only for a known flake of the emulated machine: QEMU 7.2's
    /// TCG emulation of SVM occasionally wedges the outer kernel's KVM (its
    /// watchdog reports "soft lockup" on the inner VM's vCPU threads, stuck
    /// inside `KVM_RUN`, which no user-space VMM can cause or end). Any other
    /// failure, a timeout without that signature included, fails at once.
    pub fn run(&self) -> Result<NestedReport, NestedError> {
        match self.run_once() {
            Err(NestedError::Timeout { tail, .. }) if tail.contains("soft lockup") => {
                eprintln!(
                    "nested: the emulated machine's KVM locked up (\"soft lockup\" on the vCPU threads, a QEMU TCG SVM flake); retrying once"
                );
                self.run_once()
            }
            other => other,
        }
    }

    fn run_once(&self) -> Result<NestedReport, NestedError> {
        let _one_at_a_time = ONE_MACHINE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tmp = tempfile::tempdir().map_err(io("creating a temporary directory"))?;
        let initrd = tmp.path().join("outer.cpio");
        self.initramfs(&initrd)?;

        let qemu = std::env::var_os("REDDOG_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into());
        let mut append = String::from("console=ttyS0 panic=-1 quiet loglevel=1");
        let mut cmd = Command::new(&qemu);
        match host_tsc_khz() {
            Some(khz) => {
                cmd.args(["-M", "microvm"]);
                append.push_str(&format!(" tsc_early_khz={khz}"));
            }
            None => {
                cmd.args(["-M", "q35"]);
            }
        }
        let cpu = std::env::var("REDDOG_NESTED_CPU").unwrap_or_else(|_| OUTER_CPU.to_owned());
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", &cpu])
            .args(["-m", &OUTER_MEMORY_MIB.to_string(), "-smp", "2"])
            .args([
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&self.kernel.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| NestedError::NoQemu {
            qemu: qemu.to_string_lossy().into_owned(),
            source,
        })?;
        let echo = std::env::var_os("REDDOG_NESTED_ECHO").is_some();
        let live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let stdout = reader(child.stdout.take(), echo, live);
        let stderr = reader(child.stderr.take(), false, None);
        let status = wait_with_limit(&mut child, self.timeout);
        let elapsed = started.elapsed();
        let out = join(stdout);
        let err = join(stderr);
        let console = String::from_utf8_lossy(&out).into_owned();
        let status = match status.map_err(io("waiting for QEMU"))? {
            Some(s) => s,
            None => {
                return Err(NestedError::Timeout {
                    limit: self.timeout,
                    tail: tail(&console, 40),
                })
            }
        };
        let (rc, sections) = parse_console(&console);
        match rc {
            Some(rc) => Ok(NestedReport {
                rc,
                sections,
                console,
                elapsed,
            }),
            None => Err(NestedError::Incomplete {
                status: status.to_string(),
                tail: format!(
                    "{}\n--- QEMU stderr\n{}",
                    tail(&console, 60),
                    String::from_utf8_lossy(&err)
                ),
            }),
        }
    }
}

fn reader<R: Read + Send + 'static>(
    src: Option<R>,
    echo: bool,
    mut live: Option<LineSink>,
) -> Option<JoinHandle<Vec<u8>>> {
    let mut src = src?;
    Some(std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        // Start of the line not yet handed to `live`.
        let mut line_start = 0;
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if echo {
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    }
                    all.extend_from_slice(&buf[..n]);
                    if let Some(sink) = live.as_mut() {
                        while let Some(i) = all[line_start..].iter().position(|&b| b == b'\n') {
                            let line = String::from_utf8_lossy(&all[line_start..line_start + i]);
                            sink(line.trim_end_matches('\r'));
                            line_start += i + 1;
                        }
                    }
                }
            }
        }
        if let Some(sink) = live.as_mut() {
            if line_start < all.len() {
                sink(String::from_utf8_lossy(&all[line_start..]).trim_end_matches('\r'));
            }
        }
        all
    }))
}

fn join(h: Option<JoinHandle<Vec<u8>>>) -> Vec<u8> {
    h.and_then(|h| h.join().ok()).unwrap_or_default()
}

/// Waits for `child`; past `limit`, kills it and returns `None`.
fn wait_with_limit(
    child: &mut Child,
    limit: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One reddog-vmm run inside the outer machine.
#[derive(Debug, Clone)]
pub struct InnerVm {
    /// Host path of the guest kernel (copied into the outer machine).
    pub kernel: PathBuf,
    /// The guest's initramfs, if any.
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// reddog-vmm's own wall-clock limit.
    pub timeout_ms: u64,
    /// More reddog-vmm arguments (split on whitespace), e.g. `--disk ...`.
    pub extra_args: Vec<String>,
    /// Files put at `/guest/<name>` in the outer machine (disk images...).
    pub files: Vec<(String, Vec<u8>)>,
    /// Host binaries put at `/bin/<name>` in the outer machine (static only).
    pub bins: Vec<(String, PathBuf)>,
    /// Shell run (in the outer machine) before reddog-vmm starts; may start
    /// background helpers. Output goes to `/out/before`.
    pub before: Option<String>,
    /// Shell run while reddog-vmm runs (it was started in the background).
    /// Output goes to `/out/during`.
    pub during: Option<String>,
}

impl InnerVm {
    /// `kernel` with `cmdline`, 1 vCPU, 256 MiB, a 120 s limit and no initramfs.
    pub fn new(kernel: impl Into<PathBuf>, cmdline: &str) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: cmdline.to_owned(),
            vcpus: 1,
            memory_mib: 256,
            timeout_ms: 120_000,
            extra_args: Vec::new(),
            files: Vec::new(),
            bins: Vec::new(),
            before: None,
            during: None,
        }
    }
}

/// How an inner reddog-vmm run ended and what it printed.
#[derive(Debug, Clone)]
pub struct InnerRun {
    /// reddog-vmm's exit status.
    pub status: Option<i32>,
    /// The guest's serial console.
    pub console: String,
    /// reddog-vmm's stderr (its log).
    pub vmm_log: String,
    /// The JSON exit report.
    pub report: Option<ExitReport>,
    /// The outer machine's report.
    pub outer: NestedReport,
}

impl InnerRun {
    /// The value after `key: ` on the first console line that has it (leading
    /// kernel timestamps and stray carriage returns are ignored).
    pub fn line(&self, key: &str) -> Option<&str> {
        self.lines(key).into_iter().next()
    }

    /// Every console value after `key: `.
    pub fn lines(&self, key: &str) -> Vec<&str> {
        let prefix = format!("{key}: ");
        self.console
            .lines()
            .filter_map(|l| {
                let l = l.trim_end_matches('\r');
                let at = l.find(prefix.as_str())?;
                Some(&l[at + prefix.len()..])
            })
            .collect()
    }

    pub fn describe(&self) -> String {
        format!(
            "reddog-vmm status {:?}\n--- exit report\n{:?}\n--- guest console\n{}\n--- reddog-vmm log\n{}\n--- outer scenario log\n{}\n{}",
            self.status,
            self.report,
            self.console,
            self.vmm_log,
            self.outer.section("scenario.log").unwrap_or(""),
            self.outer.describe()
        )
    }
}

const INNER_SCENARIO: &str = r#"set -u
set -- --kernel /guest/kernel --cmdline "$(cat /guest/cmdline)" $(cat /guest/args)
[ -f /guest/initrd ] && set -- "$@" --initrd /guest/initrd
[ -f /guest/before.sh ] && sh /guest/before.sh > /out/before 2>&1
echo "reddog-vmm $*"
/bin/reddog-vmm "$@" --serial /out/console --exit-report /out/report.json 2> /out/vmm.log &
vmm=$!
[ -f /guest/during.sh ] && sh /guest/during.sh > /out/during 2>&1
wait $vmm
rc=$?
echo $rc > /out/vmm-status
echo "reddog-vmm exited $rc"
exit 0
"#;

/// Boots `vm` with the static reddog-vmm on real KVM inside an outer machine
/// running `kernel`. Guest console, VMM log and exit report come back apart.
pub fn run_vmm(kernel: &KernelArtifacts, vm: &InnerVm) -> Result<InnerRun, NestedError> {
    let mut args = format!(
        "--vcpus {} --memory-mib {} --timeout-ms {}",
        vm.vcpus, vm.memory_mib, vm.timeout_ms
    );
    for a in &vm.extra_args {
        args.push(' ');
        args.push_str(a);
    }
    let mut m = OuterMachine::new(kernel)
        .host_file("guest/kernel", 0o644, &vm.kernel)
        .file("guest/cmdline", 0o644, vm.cmdline.clone().into_bytes())
        .file("guest/args", 0o644, args.into_bytes())
        .scenario(INNER_SCENARIO)
        // The inner VMM's own limit plus the outer machine's boot and
        // reporting: a wedged run is cut short (and retried) sooner.
        .timeout(Duration::from_millis(vm.timeout_ms + 40_000).max(Duration::from_secs(90)));
    if let Some(initrd) = &vm.initrd {
        m = m.file("guest/initrd", 0o644, initrd.clone());
    }
    for (name, bytes) in &vm.files {
        m = m.file(&format!("guest/{name}"), 0o644, bytes.clone());
    }
    for (name, path) in &vm.bins {
        m = m.host_file(&format!("bin/{name}"), 0o755, path);
    }
    if let Some(sh) = &vm.before {
        m = m.file("guest/before.sh", 0o755, sh.clone().into_bytes());
    }
    if let Some(sh) = &vm.during {
        m = m.file("guest/during.sh", 0o755, sh.clone().into_bytes());
    }
    let outer = m.run()?;
    let status = outer
        .section("vmm-status")
        .and_then(|s| s.trim().parse().ok());
    let report = outer
        .section("report.json")
        .and_then(|s| serde_json::from_str(s.trim()).ok());
    Ok(InnerRun {
        status,
        console: outer.section("console").unwrap_or("").to_owned(),
        vmm_log: outer.section("vmm.log").unwrap_or("").to_owned(),
        report,
        outer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mhz_parsing() {
        assert_eq!(mhz_to_khz("2596.140"), Some(2_596_140));
        assert_eq!(mhz_to_khz(" 2596.1 "), Some(2_596_100));
        assert_eq!(mhz_to_khz("3000"), Some(3_000_000));
        assert_eq!(mhz_to_khz("2596.14099"), Some(2_596_140));
        assert_eq!(mhz_to_khz("fast"), None);
    }

    #[test]
    fn console_sections_and_status() {
        let console = "[ 1.0] boot noise\r\nREDDOG-OUTER-UP 6.1\r\nREDDOG-BEGIN console\r\nhello\r\r\nworld\r\n\r\nREDDOG-END console\r\nREDDOG-BEGIN empty\r\n\r\nREDDOG-END empty\r\nNESTED-DONE rc=3\r\n";
        let (rc, s) = parse_console(console);
        assert_eq!(rc, Some(3));
        assert_eq!(s.get("console").map(String::as_str), Some("hello\nworld\n"));
        assert_eq!(s.get("empty").map(String::as_str), Some(""));
        assert_eq!(parse_console("REDDOG-BEGIN x\nnever ends").0, None);
    }

    #[test]
    fn inner_lines_skip_timestamps() {
        let outer = NestedReport {
            rc: 0,
            sections: BTreeMap::new(),
            console: String::new(),
            elapsed: Duration::ZERO,
        };
        let run = InnerRun {
            status: Some(0),
            console: "[    1.2] reddog-inner: init ok\r\nreddog-inner: uname 6.1\n".into(),
            vmm_log: String::new(),
            report: None,
            outer,
        };
        assert_eq!(run.line("reddog-inner"), Some("init ok"));
        assert_eq!(run.lines("reddog-inner"), ["init ok", "uname 6.1"]);
    }
}
