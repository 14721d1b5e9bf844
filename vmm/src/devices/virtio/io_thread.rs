//! A device's I/O thread. It is started with the VM, before the guest runs,
//! and installs its seccomp filter first thing; a driver's activation (on a
//! vCPU thread) hands it the worker as a job, a reset waits for that job to
//! end. So a vCPU thread never starts a thread (its filter has no `clone`), and
//! an I/O thread is filtered before the first request it serves.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{Ready, Seccomp, ThreadKind};

/// A job gets the thread's stop eventfd: it returns once that is signalled.
type Job = Box<dyn FnOnce(&EventFd) + Send>;

/// A running I/O thread that serves one job at a time.
#[derive(Debug)]
pub struct IoThread {
    /// `None` once dropped: the thread's loop ends with its sender.
    jobs: Option<mpsc::Sender<Job>>,
    /// Joined on drop (taken then).
    handle: Option<JoinHandle<()>>,
    /// Signalled to end the running job ([`IoThread::stop`]).
    stop: EventFd,
}

/// A job handed to an [`IoThread`]; [`Running::join`] waits for its end.
#[derive(Debug)]
pub struct Running<T> {
    rx: mpsc::Receiver<std::thread::Result<T>>,
}

impl<T> Running<T> {
    /// Waits for the job to end; `None` if it panicked or the thread is gone.
    pub fn join(self) -> Option<T> {
        self.rx.recv().ok().and_then(Result::ok)
    }
}

impl IoThread {
    /// Starts the thread `name`, filtered as `kind` when `seccomp` is on.
    pub fn start(
        name: String,
        kind: ThreadKind,
        seccomp: &Seccomp,
    ) -> std::io::Result<(Self, Ready)> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_job = stop.try_clone()?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (handle, ready) = seccomp.spawn(name, kind, move || {
            // Ends when the device (the sender) is dropped.
            for job in rx {
                job(&stop_job);
            }
        })?;
        Ok((
            Self {
                jobs: Some(jobs),
                handle: Some(handle),
                stop,
            },
            ready,
        ))
    }

    /// Runs `f` on the thread; `f` must return once the eventfd it gets is
    /// signalled.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EventFd) -> T + Send + 'static,
    ) -> std::io::Result<Running<T>> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |stop| {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(|| f(stop))));
        });
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !sent {
            return Err(std::io::Error::other(format!(
                "the I/O thread {} has ended",
                self.name().unwrap_or("?")
            )));
        }
        Ok(Running { rx })
    }

    /// Signals the running job to end and waits for it; `None` if it panicked
    /// or the thread is gone. The thread then waits for the next job.
    pub fn stop<T>(&self, running: Running<T>) -> Option<T> {
        self.stop.write(1).ok()?;
        let result = running.join();
        // Cleared for the next job (the job may have read it already).
        let _ = self.stop.read();
        result
    }

    /// The thread's name.
    pub fn name(&self) -> Option<&str> {
        self.handle.as_ref().and_then(|h| h.thread().name())
    }
}

/// A dropped device's thread ends with it (tests and fuzzing drop devices;
/// the VMM never does): the running job is told to stop, the job loop ends
/// with its sender, and the thread is joined, so no thread outlives its
/// device (a fuzzer's leak check saw one still running).
impl Drop for IoThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        self.jobs = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_turn_and_a_panic_does_not_end_the_thread() {
        let (t, ready) =
            IoThread::start("io-test".into(), ThreadKind::Block, &Seccomp::off()).expect("start");
        ready.wait().expect("ready");
        assert_eq!(t.name(), Some("io-test"));
        let name = t
            .run(|_| std::thread::current().name().map(str::to_owned))
            .expect("run")
            .join();
        assert_eq!(name.flatten().as_deref(), Some("io-test"));
        let panicked = t
            .run(|_| -> u32 { panic!("a worker bug") })
            .expect("run")
            .join();
        assert!(panicked.is_none());
        // A job that waits for the stop, twice: the stop is cleared between.
        for round in 0..2 {
            let waits = t
                .run(move |stop| {
                    while stop.read().is_err() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    round
                })
                .expect("run");
            assert_eq!(t.stop(waits), Some(round));
        }
        let quick = t.run(|stop| stop.read().is_err()).expect("run").join();
        assert_eq!(quick, Some(true), "no stop left over");
    }
}
