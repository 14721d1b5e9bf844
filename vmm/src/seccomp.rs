//! Seccomp filters, one per kind of thread (docs/isolation.md, "Seccomp filters").
//!
//! Every thread of a running VMM installs the filter of its kind as the first
//! thing it does, before it touches anything the guest drives; the main thread
//! installs its own once the VM is built (files, KVM, guest memory and sockets
//! open, every other thread started and filtered) and only then lets the vCPUs
//! run. A syscall outside a thread's filter kills the whole process (`SIGSYS`).
//!
//! The tables below are the policy, written as data: [`rules`] gives the lines
//! of one kind's filter; each line names a syscall and, where that is cheap and
//! says something, the argument values it may take (the vCPU's `ioctl` requests,
//! no `PROT_EXEC` in `mmap`/`mprotect`, `AF_UNIX` sockets only...). They are
//! compiled to BPF with `seccompiler` once, at start ([`Seccomp::on`]).
//!
//! Filters stack: a thread started by a filtered thread keeps its parent's
//! filter under its own. The only thread started after set-up is `api-client`
//! (by `api`), so `api`'s table also holds what an `api-client` thread does.
//!
//! To find what a new code path needs: run it with `--no-seccomp` under
//! `strace -f -qq` and read the syscalls each thread makes after its start.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ};

/// The kinds of threads a VMM runs; each has its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread once the VM is built: waits for a stop, writes the report.
    Main,
    /// A vCPU thread (`vcpu0`, `vcpu1`...): `KVM_RUN` and the device models.
    Vcpu,
    /// A virtio-blk I/O thread (`virtio-blk0`...): the disk image's file.
    Block,
    /// The virtio-vsock thread: the guest's connections to host unix sockets.
    Vsock,
    /// A virtio-net I/O thread (`virtio-net0`...): frames between the queues
    /// and the TAP.
    Net,
    /// The control socket's accept thread (`api`); starts `api-client` threads.
    Api,
    /// One control socket client (`api-client`).
    ApiClient,
    /// The control socket's event thread (`api-events`).
    ApiEvents,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::Vsock,
        ThreadKind::Net,
        ThreadKind::Api,
        ThreadKind::ApiClient,
        ThreadKind::ApiEvents,
    ];

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "virtio-blk",
            ThreadKind::Vsock => "virtio-vsock",
            ThreadKind::Net => "virtio-net",
            ThreadKind::Api => "api",
            ThreadKind::ApiClient => "api-client",
            ThreadKind::ApiEvents => "api-events",
        }
    }
}

/// Errors building or installing filters. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A table does not make a valid filter (a bug in this module).
    #[error("the {kind} seccomp filter is invalid: {why}; this is a bug in vmm/src/seccomp.rs (run with --no-seccomp meanwhile)")]
    Build {
        /// Which filter.
        kind: &'static str,
        /// What seccompiler said.
        why: String,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {kind} seccomp filter on thread {thread}: {why}; the kernel needs CONFIG_SECCOMP_FILTER (or run with --no-seccomp, unprotected)")]
    Install {
        /// Which filter.
        kind: &'static str,
        /// The thread.
        thread: String,
        /// What failed.
        why: String,
    },
    /// A thread ended before it said whether its filter is in place.
    #[error("thread {thread} ended before installing its seccomp filter")]
    ThreadGone {
        /// The thread.
        thread: String,
    },
}

/// A condition on one argument of a syscall (compared as 32 bits: every
/// argument filtered here is an `int` or `unsigned int` in the kernel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// Argument `.0` is one of these values.
    OneOf(u8, Vec<u64>),
    /// Argument `.0` has none of the bits of `.1` set.
    Clear(u8, u64),
}

/// One line of a filter: `syscall` is allowed when every condition of `when`
/// holds (always, when `when` is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    /// The syscall's name (for messages and docs).
    pub name: &'static str,
    /// Its number on this architecture.
    pub nr: i64,
    /// Conditions on its arguments, all of which must hold.
    pub when: Vec<Arg>,
}

fn any(name: &'static str, nr: i64) -> Allow {
    Allow {
        name,
        nr,
        when: Vec::new(),
    }
}

fn with(name: &'static str, nr: i64, when: Vec<Arg>) -> Allow {
    Allow { name, nr, when }
}

const KVMIO: u32 = 0xAE;
/// `KVM_RUN`.
pub const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0) as u64;
/// `KVM_GET_REGS` (the failure report).
pub const KVM_GET_REGS: u64 = ioctl_expr(
    _IOC_READ,
    KVMIO,
    0x81,
    std::mem::size_of::<kvm_bindings::kvm_regs>() as u32,
) as u64;
/// `KVM_GET_SREGS` (the failure report).
pub const KVM_GET_SREGS: u64 = ioctl_expr(
    _IOC_READ,
    KVMIO,
    0x83,
    std::mem::size_of::<kvm_bindings::kvm_sregs>() as u32,
) as u64;
/// `KVM_GET_VCPU_EVENTS` (the failure report).
pub const KVM_GET_VCPU_EVENTS: u64 = ioctl_expr(
    _IOC_READ,
    KVMIO,
    0x9f,
    std::mem::size_of::<kvm_bindings::kvm_vcpu_events>() as u32,
) as u64;

/// What the tables depend on at run time.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// This process (a thread may signal only its own process).
    pub pid: u32,
    /// The signal that kicks a vCPU out of `KVM_RUN` (`control::gate`).
    pub kick_signal: i32,
}

impl Context {
    /// This process's context.
    pub fn current() -> Self {
        Self {
            pid: std::process::id(),
            kick_signal: crate::control::gate::kick_signal(),
        }
    }
}

/// What every thread does: allocate and free memory, take locks, read the
/// clock, log to stderr, end (its own thread), abort on a fatal error.
fn common(ctx: &Context) -> Vec<Allow> {
    use libc::*;
    let no_exec = || vec![Arg::Clear(2, PROT_EXEC as u64)];
    vec![
        // Memory (malloc arenas, thread stacks). Never executable.
        with("mmap", SYS_mmap, no_exec()),
        with("mprotect", SYS_mprotect, no_exec()),
        any("munmap", SYS_munmap),
        any("madvise", SYS_madvise),
        any("mremap", SYS_mremap),
        any("brk", SYS_brk),
        // Locks, condition variables, channels, parking.
        any("futex", SYS_futex),
        any("sched_yield", SYS_sched_yield),
        // Time (when the vDSO is not used) and sleeping.
        any("clock_gettime", SYS_clock_gettime),
        any("clock_nanosleep", SYS_clock_nanosleep),
        any("nanosleep", SYS_nanosleep),
        any("restart_syscall", SYS_restart_syscall),
        // Hash map keys.
        any("getrandom", SYS_getrandom),
        // Logging (stderr) and dropping descriptors (debug builds of std
        // check a descriptor is open before closing it).
        any("write", SYS_write),
        any("close", SYS_close),
        with(
            "fcntl",
            SYS_fcntl,
            vec![Arg::OneOf(1, vec![F_GETFD as u64])],
        ),
        // The end of a thread: its signal stack goes, then the thread.
        any("sigaltstack", SYS_sigaltstack),
        any("exit", SYS_exit),
        // abort(): SIGABRT to this process only.
        any("rt_sigprocmask", SYS_rt_sigprocmask),
        any("gettid", SYS_gettid),
        any("getpid", SYS_getpid),
        with(
            "tgkill",
            SYS_tgkill,
            vec![
                Arg::OneOf(0, vec![u64::from(ctx.pid)]),
                Arg::OneOf(2, vec![SIGABRT as u64]),
            ],
        ),
    ]
}

/// The main thread after set-up: waits for the stop (channels), flushes the
/// console, writes the exit report to the file opened at start, tells the
/// control socket's subscribers, removes the socket files and exits. It never
/// tears the devices down (no thread does: the process exit does).
fn main_thread() -> Vec<Allow> {
    use libc::*;
    vec![
        any("writev", SYS_writev),
        any("fsync", SYS_fsync),
        any("shutdown", SYS_shutdown),
        any("sendto", SYS_sendto),
        // The control and vsock sockets' files: checked to be ours, removed.
        any("statx", SYS_statx),
        any("newfstatat", SYS_newfstatat),
        any("lstat", SYS_lstat),
        any("unlink", SYS_unlink),
        any("unlinkat", SYS_unlinkat),
        any("exit_group", SYS_exit_group),
    ]
}

/// A vCPU: `KVM_RUN` and the register reads of a failure report on its own
/// vCPU fd; the device models it runs on exits (eventfd and irqfd writes, the
/// serial console, handing queues to I/O threads); the kick signal's return.
fn vcpu() -> Vec<Allow> {
    use libc::*;
    vec![
        with(
            "ioctl",
            SYS_ioctl,
            vec![Arg::OneOf(
                1,
                vec![KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_VCPU_EVENTS],
            )],
        ),
        any("read", SYS_read),
        any("writev", SYS_writev),
        any("rt_sigreturn", SYS_rt_sigreturn),
    ]
}

/// A virtio-blk I/O thread: waits on its queue and stop eventfds and serves
/// requests on the image's already-open file.
fn block() -> Vec<Allow> {
    use libc::*;
    vec![
        any("epoll_create1", SYS_epoll_create1),
        any("epoll_ctl", SYS_epoll_ctl),
        any("epoll_wait", SYS_epoll_wait),
        any("epoll_pwait", SYS_epoll_pwait),
        any("read", SYS_read),
        any("pread64", SYS_pread64),
        any("pwrite64", SYS_pwrite64),
        any("preadv", SYS_preadv),
        any("pwritev", SYS_pwritev),
        any("fdatasync", SYS_fdatasync),
        any("fsync", SYS_fsync),
        // Discard and write-zeroes; an overlay that grows.
        any("fallocate", SYS_fallocate),
        any("ftruncate", SYS_ftruncate),
        any("fstat", SYS_fstat),
        any("statx", SYS_statx),
        any("newfstatat", SYS_newfstatat),
        any("lseek", SYS_lseek),
        // The rate limiter's timer (made before the filter).
        any("timerfd_settime", SYS_timerfd_settime),
    ]
}

/// The virtio-vsock thread: its epoll over the queues and host sockets; the
/// listener's accepts; non-blocking connects to `<uds>_<port>` (unix sockets only).
fn vsock() -> Vec<Allow> {
    use libc::*;
    vec![
        any("epoll_create1", SYS_epoll_create1),
        any("epoll_ctl", SYS_epoll_ctl),
        any("epoll_wait", SYS_epoll_wait),
        any("epoll_pwait", SYS_epoll_pwait),
        any("read", SYS_read),
        any("recvfrom", SYS_recvfrom),
        any("sendto", SYS_sendto),
        any("accept4", SYS_accept4),
        with(
            "socket",
            SYS_socket,
            vec![Arg::OneOf(0, vec![AF_UNIX as u64])],
        ),
        any("connect", SYS_connect),
        any("shutdown", SYS_shutdown),
        with(
            "fcntl",
            SYS_fcntl,
            vec![Arg::OneOf(1, vec![F_GETFL as u64, F_SETFL as u64])],
        ),
        with("ioctl", SYS_ioctl, vec![Arg::OneOf(1, vec![FIONBIO])]),
        any("getsockopt", SYS_getsockopt),
    ]
}

/// `TUNSETOFFLOAD` (`_IOW('T', 208, unsigned int)`).
pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// A virtio-net thread: its epoll over the queue, TAP, stop and rate-limit
/// timer fds; frames read from and written to the already-open TAP; the
/// offloads the guest accepted set on the TAP at activation.
fn net() -> Vec<Allow> {
    use libc::*;
    vec![
        any("epoll_create1", SYS_epoll_create1),
        any("epoll_ctl", SYS_epoll_ctl),
        any("epoll_wait", SYS_epoll_wait),
        any("epoll_pwait", SYS_epoll_pwait),
        any("read", SYS_read),
        any("readv", SYS_readv),
        any("writev", SYS_writev),
        any("timerfd_settime", SYS_timerfd_settime),
        with("ioctl", SYS_ioctl, vec![Arg::OneOf(1, vec![TUNSETOFFLOAD])]),
    ]
}

/// What an `api-client` thread does: reads requests and writes answers on its
/// connection, pauses (kicks vCPU threads with the kick signal), reads the pid.
fn api_client(ctx: &Context) -> Vec<Allow> {
    use libc::*;
    vec![
        any("read", SYS_read),
        any("recvfrom", SYS_recvfrom),
        any("sendto", SYS_sendto),
        any("shutdown", SYS_shutdown),
        // `try_clone` of its stream.
        with(
            "fcntl",
            SYS_fcntl,
            vec![Arg::OneOf(1, vec![F_DUPFD_CLOEXEC as u64])],
        ),
        with(
            "tgkill",
            SYS_tgkill,
            vec![
                Arg::OneOf(0, vec![u64::from(ctx.pid)]),
                Arg::OneOf(2, vec![ctx.kick_signal as u64]),
            ],
        ),
    ]
}

/// The accept thread: accepts, sets the write timeout, answers `busy`, and
/// starts one `api-client` thread per client (which starts under this filter,
/// so what it does is here too).
fn api(ctx: &Context) -> Vec<Allow> {
    use libc::*;
    let mut t = vec![
        any("accept4", SYS_accept4),
        any("setsockopt", SYS_setsockopt),
        // Starting a thread, and that thread's own start.
        any("clone3", SYS_clone3),
        any("clone", SYS_clone),
        any("set_robust_list", SYS_set_robust_list),
        any("rseq", SYS_rseq),
        any("sched_getaffinity", SYS_sched_getaffinity),
        with(
            "prctl",
            SYS_prctl,
            vec![Arg::OneOf(
                0,
                vec![PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64],
            )],
        ),
        with(
            "seccomp",
            SYS_seccomp,
            vec![Arg::OneOf(0, vec![u64::from(SECCOMP_SET_MODE_FILTER)])],
        ),
    ];
    t.extend(api_client(ctx));
    t
}

/// The event thread: writes events to subscribers, drops those that do not read.
fn api_events() -> Vec<Allow> {
    use libc::*;
    vec![any("sendto", SYS_sendto), any("shutdown", SYS_shutdown)]
}

/// The lines of `kind`'s filter: what every thread does, then its own.
pub fn rules(kind: ThreadKind, ctx: &Context) -> Vec<Allow> {
    let mut t = common(ctx);
    t.extend(match kind {
        ThreadKind::Main => main_thread(),
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Block => block(),
        ThreadKind::Vsock => vsock(),
        ThreadKind::Net => net(),
        ThreadKind::Api => api(ctx),
        ThreadKind::ApiClient => api_client(ctx),
        ThreadKind::ApiEvents => api_events(),
    });
    t
}

/// The seccompiler rules of one line (`None`: any arguments).
fn line_rules(line: &Allow) -> Result<Option<Vec<SeccompRule>>, seccompiler::BackendError> {
    if line.when.is_empty() {
        return Ok(None);
    }
    // Each condition is a set of alternatives; a rule is one pick from each.
    let mut picks: Vec<Vec<SeccompCondition>> = vec![Vec::new()];
    for arg in &line.when {
        let options: Vec<SeccompCondition> = match arg {
            Arg::OneOf(index, values) => values
                .iter()
                .map(|&v| {
                    SeccompCondition::new(*index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                })
                .collect::<Result<_, _>>()?,
            Arg::Clear(index, mask) => vec![SeccompCondition::new(
                *index,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(*mask),
                0,
            )?],
        };
        picks = picks
            .into_iter()
            .flat_map(|p| {
                options.iter().map(move |o| {
                    let mut p = p.clone();
                    p.push(o.clone());
                    p
                })
            })
            .collect();
    }
    picks
        .into_iter()
        .map(SeccompRule::new)
        .collect::<Result<_, _>>()
        .map(Some)
}

/// Compiles `kind`'s filter: lines allow, anything else kills the process.
pub fn compile(kind: ThreadKind, ctx: &Context) -> Result<BpfProgram, SeccompError> {
    let err = |why: String| SeccompError::Build {
        kind: kind.name(),
        why,
    };
    // A syscall on several lines: allowed if any line allows it.
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for line in rules(kind, ctx) {
        let new = line_rules(&line).map_err(|e| err(format!("{}: {e}", line.name)))?;
        match (map.get_mut(&line.nr), new) {
            (None, new) => {
                map.insert(line.nr, new);
            }
            (Some(old), None) => *old = None,
            (Some(Some(old)), Some(new)) => old.extend(new),
            (Some(None), Some(_)) => {}
        }
    }
    let map = map
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(
        map,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| err(e.to_string()))?;
    filter.try_into().map_err(|e| err(format!("{e}")))
}

/// The compiled filter of every thread kind.
#[derive(Debug)]
pub struct Filters {
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

impl Filters {
    /// Compiles every kind's filter for this process.
    pub fn compile() -> Result<Self, SeccompError> {
        let ctx = Context::current();
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            programs.insert(kind, compile(kind, &ctx)?);
        }
        Ok(Self { programs })
    }

    /// Installs `kind`'s filter on the calling thread (and sets its
    /// `no_new_privs`, which a filter needs without `CAP_SYS_ADMIN`).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let thread = || {
            std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_owned()
        };
        let prog = self
            .programs
            .get(&kind)
            .ok_or_else(|| SeccompError::Install {
                kind: kind.name(),
                thread: thread(),
                why: "no such filter compiled".into(),
            })?;
        seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install {
            kind: kind.name(),
            thread: thread(),
            why: e.to_string(),
        })
    }
}

/// glibc's malloc opens files lazily, from whichever thread gets there first:
/// `/sys/devices/system/cpu/online` when the process needs a ninth arena, and
/// `/proc/sys/vm/overcommit_memory` the first time a thread's arena heap
/// shrinks; no filter allows `openat`. With one arena (the main one, grown with
/// `brk`, each thread keeping its own small-object cache) neither happens.
#[allow(unsafe_code)]
fn fix_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets a malloc parameter; called before the
        // VMM's threads exist.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

/// Whether the VMM's threads are filtered: shared by everything that starts a thread.
#[derive(Debug, Clone)]
pub struct Seccomp(Option<Arc<Filters>>);

/// A started thread's word on its filter ([`Seccomp::spawn`]).
#[derive(Debug)]
pub struct Ready {
    thread: String,
    rx: mpsc::Receiver<Result<(), SeccompError>>,
}

impl Ready {
    /// Waits until the thread has installed its filter (or failed to).
    pub fn wait(self) -> Result<(), SeccompError> {
        self.rx.recv().unwrap_or(Err(SeccompError::ThreadGone {
            thread: self.thread,
        }))
    }
}

impl Seccomp {
    /// Filters on: compiles them. Call before the VMM starts threads.
    pub fn on() -> Result<Self, SeccompError> {
        fix_malloc_arenas();
        Ok(Self(Some(Arc::new(Filters::compile()?))))
    }

    /// Filters off (`--no-seccomp`).
    pub fn off() -> Self {
        Self(None)
    }

    /// Whether threads install filters.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Installs `kind`'s filter on the calling thread (nothing when off).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        match &self.0 {
            Some(f) => f.install(kind),
            None => Ok(()),
        }
    }

    /// Starts a thread named `name` that installs `kind`'s filter, tells the
    /// returned [`Ready`] how that went, and runs `f` only once it is in place.
    pub fn spawn(
        &self,
        name: String,
        kind: ThreadKind,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<(std::thread::JoinHandle<()>, Ready)> {
        let (tx, rx) = mpsc::channel();
        let me = self.clone();
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let installed = me.install(kind);
                let ok = installed.is_ok();
                if let Err(e) = &installed {
                    tracing::error!("{e}");
                }
                // Nobody may wait (an `api-client`): the thread goes on regardless.
                let _ = tx.send(installed);
                drop(me);
                if ok {
                    f();
                }
            })?;
        Ok((handle, Ready { thread: name, rx }))
    }
}

#[cfg(test)]
// The probes make raw syscalls on purpose.
#[allow(unsafe_code)]
pub(crate) mod tests {
    use super::*;

    /// Set in a copy of a test binary that [`in_child`] runs.
    const CHILD: &str = "REDDOG_SECCOMP_TEST_CHILD";

    /// Whether this process is a child that [`in_child`] started.
    pub(crate) fn is_child() -> bool {
        std::env::var_os(CHILD).is_some()
    }

    /// Runs test `name` (its full path) alone in a fresh copy of this test
    /// binary, where [`is_child`] is true; returns how that process ended.
    pub(crate) fn in_child(name: &str) -> std::process::Output {
        let exe = std::env::current_exe().expect("test binary");
        std::process::Command::new(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .expect("run the test binary")
    }

    pub(crate) fn signal_of(out: &std::process::Output) -> Option<i32> {
        std::os::unix::process::ExitStatusExt::signal(&out.status)
    }

    fn ctx() -> Context {
        Context::current()
    }

    #[test]
    fn every_filter_compiles_and_says_what_it_allows() {
        let f = Filters::compile().expect("filters compile");
        for kind in ThreadKind::ALL {
            let p = &f.programs[&kind];
            assert!(!p.is_empty(), "{kind:?}");
            // Within the kernel's limit of 4096 instructions, with room.
            assert!(p.len() < 1024, "{kind:?}: {} instructions", p.len());
            let names: Vec<_> = rules(kind, &ctx()).iter().map(|a| a.name).collect();
            for must in ["futex", "mmap", "write", "exit"] {
                assert!(names.contains(&must), "{kind:?} lacks {must}");
            }
        }
    }

    #[test]
    fn only_the_threads_that_need_them_may_start_threads_or_open_files() {
        for kind in ThreadKind::ALL {
            let names: Vec<_> = rules(kind, &ctx()).iter().map(|a| a.name).collect();
            for never in [
                "open", "openat", "execve", "execveat", "fork", "vfork", "ptrace",
            ] {
                assert!(!names.contains(&never), "{kind:?} allows {never}");
            }
            let spawns = names.contains(&"clone") || names.contains(&"clone3");
            assert_eq!(spawns, kind == ThreadKind::Api, "{kind:?} and clone");
            let sockets = names.contains(&"socket") || names.contains(&"connect");
            assert_eq!(sockets, kind == ThreadKind::Vsock, "{kind:?} and socket");
            assert_eq!(
                names.contains(&"exit_group"),
                kind == ThreadKind::Main,
                "{kind:?} and exit_group"
            );
        }
    }

    #[test]
    fn kvm_ioctl_numbers_are_the_kernels() {
        // From linux/kvm.h on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
    }

    #[test]
    fn a_line_with_alternatives_becomes_one_rule_per_pick() {
        let line = with(
            "tgkill",
            libc::SYS_tgkill,
            vec![Arg::OneOf(0, vec![1, 2]), Arg::OneOf(2, vec![6, 34, 35])],
        );
        let rules = line_rules(&line).expect("rules").expect("conditional");
        assert_eq!(rules.len(), 6);
        assert_eq!(
            line_rules(&any("read", libc::SYS_read)).expect("rules"),
            None
        );
    }

    /// In a child: installs the vCPU filter on a new thread (as a vCPU does),
    /// checks an allowed `ioctl` comes back (EBADF: the syscall ran), then
    /// calls what a vCPU never does.
    fn probe_vcpu(forbidden: impl FnOnce() + Send + 'static) {
        let s = Seccomp::on().expect("filters");
        let (t, ready) = s
            .spawn("vcpu0".into(), ThreadKind::Vcpu, move || {
                // SAFETY: an ioctl on an invalid fd touches no memory.
                let rc = unsafe { libc::ioctl(-1, KVM_RUN as _, 0) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                assert_eq!((rc, errno), (-1, Some(libc::EBADF)), "KVM_RUN is allowed");
                eprintln!("allowed syscalls ran");
                forbidden();
                eprintln!("the forbidden syscall returned");
            })
            .expect("spawn");
        ready.wait().expect("installed");
        let _ = t.join();
    }

    fn check_killed(name: &str) {
        let out = in_child(name);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            signal_of(&out),
            Some(libc::SIGSYS),
            "{name}: the child should die of SIGSYS: {:?}\n{stderr}",
            out.status
        );
        assert!(stderr.contains("allowed syscalls ran"), "{stderr}");
        assert!(!stderr.contains("forbidden syscall returned"), "{stderr}");
    }

    #[test]
    fn a_syscall_outside_the_vcpu_filter_kills_the_process_with_sigsys() {
        if is_child() {
            probe_vcpu(|| {
                // SAFETY: a plain syscall with no pointers.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                eprintln!("socket returned {fd}");
            });
            return;
        }
        check_killed(
            "seccomp::tests::a_syscall_outside_the_vcpu_filter_kills_the_process_with_sigsys",
        );
    }

    #[test]
    fn an_ioctl_the_vcpu_filter_does_not_name_kills_the_process() {
        if is_child() {
            probe_vcpu(|| {
                let mut n: libc::c_int = 1;
                // SAFETY: FIONBIO on stdin reads one int we own.
                let rc = unsafe { libc::ioctl(0, libc::FIONBIO, &mut n) };
                eprintln!("ioctl returned {rc}");
            });
            return;
        }
        check_killed("seccomp::tests::an_ioctl_the_vcpu_filter_does_not_name_kills_the_process");
    }

    #[test]
    fn executable_memory_is_refused() {
        if is_child() {
            probe_vcpu(|| {
                // SAFETY: an anonymous mapping nobody uses.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                eprintln!("mmap returned {p:?}");
            });
            return;
        }
        check_killed("seccomp::tests::executable_memory_is_refused");
    }

    /// Without filters the same probe survives: the tests above fail for the
    /// filter's sake, not the probe's.
    #[test]
    fn without_filters_the_probe_survives() {
        if is_child() {
            let s = Seccomp::off();
            let (t, ready) = s
                .spawn("vcpu0".into(), ThreadKind::Vcpu, || {
                    // SAFETY: a plain syscall with no pointers.
                    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                    assert!(fd >= 0);
                    // SAFETY: our own fd.
                    unsafe { libc::close(fd) };
                })
                .expect("spawn");
            ready.wait().expect("ready");
            t.join().expect("thread");
            return;
        }
        let out = in_child("seccomp::tests::without_filters_the_probe_survives");
        assert!(
            out.status.success(),
            "{:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
