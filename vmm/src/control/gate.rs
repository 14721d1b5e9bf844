//! Pausing and resuming vCPUs.
//!
//! A vCPU thread checks [`Gate::check`] (one atomic load) before each
//! `KVM_RUN`. To pause, the controller raises the flag and *kicks* every vCPU
//! thread with a real-time signal ([`kick_signal`]) whose handler does nothing
//! and is installed without `SA_RESTART`: a thread inside `KVM_RUN` (running
//! guest code or halted in the kernel) comes back with `EINTR`, sees the flag
//! and parks on a condition variable. A signal that lands just before a thread
//! enters `KVM_RUN` is lost, so the controller kicks the threads that have not
//! parked again every few milliseconds until all have.
//!
//! The signal handler is registered (process-wide) when the control socket
//! starts ([`prepare_kick`]) or on the first kick, so a VMM without a control
//! socket never installs it. `vmm-sys-util` wraps `sigaction`
//! and `pthread_kill`; kicked threads are the vCPU threads, whose join handles
//! the gate keeps (never joined), so a thread id is never reused while kicked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// How often threads that have not parked are kicked again.
const REKICK: Duration = Duration::from_millis(5);

/// Where a vCPU thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Parked,
    Exited,
}

struct Inner {
    paused: bool,
    phases: Vec<Phase>,
}

/// The pause gate of a VM's vCPUs.
pub struct Gate {
    /// Read before every `KVM_RUN`: set while a pause is wanted.
    pause: AtomicBool,
    inner: Mutex<Inner>,
    changed: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing: the point is that KVM_RUN returns EINTR.
}

/// Registers the kick handler now (the control server does, at start, before
/// the threads' seccomp filters leave no `rt_sigaction`).
pub fn prepare_kick() -> Result<(), String> {
    install_kick_handler()
}

/// Registers the no-op kick handler once (`SA_SIGINFO`, no `SA_RESTART`).
fn install_kick_handler() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"))
        })
        .clone()
}

impl Gate {
    /// A gate for `vcpus` vCPUs, open, or closed (`held`: every vCPU parks
    /// before its first `KVM_RUN` until [`Gate::resume`]).
    pub fn new(vcpus: u8, held: bool) -> Self {
        Self {
            pause: AtomicBool::new(held),
            inner: Mutex::new(Inner {
                paused: held,
                phases: vec![Phase::Running; usize::from(vcpus)],
            }),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the vCPU threads' handles for kicking.
    pub fn set_threads(&self, threads: Vec<JoinHandle<()>>) {
        *self.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
    }

    /// Called by vCPU `index` before each `KVM_RUN`: parks while paused.
    #[inline]
    pub fn check(&self, index: u8) {
        if self.pause.load(Ordering::Acquire) {
            self.park(index);
        }
    }

    #[cold]
    fn park(&self, index: u8) {
        let i = usize::from(index);
        let mut g = self.lock();
        if !g.paused || i >= g.phases.len() {
            return;
        }
        g.phases[i] = Phase::Parked;
        self.changed.notify_all();
        while g.paused {
            g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.phases[i] = Phase::Running;
    }

    /// Called when vCPU `index`'s run loop ended: a pause no longer waits for it.
    pub fn exited(&self, index: u8) {
        let mut g = self.lock();
        if let Some(p) = g.phases.get_mut(usize::from(index)) {
            *p = Phase::Exited;
        }
        self.changed.notify_all();
    }

    /// Whether the vCPUs are paused (or being paused).
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Pauses every vCPU; returns once each is parked (or has exited). If one
    /// has not parked within `limit`, the pause is undone and the error names it.
    pub fn pause(&self, limit: Duration) -> Result<(), String> {
        install_kick_handler()?;
        let deadline = Instant::now() + limit;
        let mut g = self.lock();
        if g.paused {
            return Ok(());
        }
        g.paused = true;
        self.pause.store(true, Ordering::Release);
        loop {
            let running: Vec<usize> = (0..g.phases.len())
                .filter(|&i| g.phases[i] == Phase::Running)
                .collect();
            if running.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                g.paused = false;
                self.pause.store(false, Ordering::Release);
                self.changed.notify_all();
                return Err(format!(
                    "vCPU(s) {running:?} did not stop within {} ms; the VM keeps running",
                    limit.as_millis()
                ));
            }
            drop(g);
            self.kick(&running);
            g = self.lock();
            let wait = REKICK.min(deadline - now);
            g = self
                .changed
                .wait_timeout(g, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        let mut g = self.lock();
        g.paused = false;
        self.pause.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    fn kick(&self, which: &[usize]) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for &i in which {
            if let Some(t) = threads.get(i) {
                // A thread that already ended is not an error worth reporting:
                // it counts as stopped once it marks itself exited.
                let _ = t.kill(kick_signal());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Threads that spin through `check` (like vCPUs between exits), or block
    /// in a long `sleep` (like a vCPU halted in `KVM_RUN`): both stop.
    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        let gate = Arc::new(Gate::new(2, false));
        let work = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for index in 0..2u8 {
            let (gate, work, stop) = (gate.clone(), work.clone(), stop.clone());
            handles.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    gate.check(index);
                    if index == 1 {
                        // Interrupted by the kick: `sleep` retries, so sleep in
                        // short steps and re-check like a vCPU after EINTR.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    work.fetch_add(1, Ordering::Relaxed);
                }
                gate.exited(index);
            }));
        }
        gate.set_threads(handles);
        std::thread::sleep(Duration::from_millis(20));
        gate.pause(Duration::from_secs(5)).expect("pause");
        assert!(gate.is_paused());
        let before = work.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(work.load(Ordering::Relaxed), before, "paused threads ran");
        // Pausing again is a no-op.
        gate.pause(Duration::from_secs(1)).expect("pause again");
        gate.resume();
        std::thread::sleep(Duration::from_millis(50));
        assert!(work.load(Ordering::Relaxed) > before, "resumed threads run");
        stop.store(true, Ordering::Relaxed);
        // An exited thread does not hold up a pause.
        std::thread::sleep(Duration::from_millis(20));
        gate.pause(Duration::from_secs(5))
            .expect("pause with exited threads");
        gate.resume();
    }

    /// A held gate parks a thread before its first step, until resumed.
    #[test]
    fn a_held_gate_parks_before_the_first_step() {
        let gate = Arc::new(Gate::new(1, true));
        assert!(gate.is_paused());
        let work = Arc::new(AtomicU64::new(0));
        let (g, w) = (gate.clone(), work.clone());
        let t = std::thread::spawn(move || {
            g.check(0);
            w.fetch_add(1, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(work.load(Ordering::SeqCst), 0, "a held thread ran");
        gate.resume();
        t.join().expect("thread");
        assert_eq!(work.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_thread_that_never_parks_fails_the_pause() {
        let gate = Gate::new(1, false);
        // No thread: vCPU 0 stays "running" forever.
        let err = gate
            .pause(Duration::from_millis(30))
            .expect_err("cannot park");
        assert!(err.contains("[0]"), "{err}");
        assert!(!gate.is_paused());
    }
}
