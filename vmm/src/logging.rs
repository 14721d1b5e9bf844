//! The VMM's own log (stderr, which the agent's launcher redirects into
//! `vmm.log`), bounded whatever the guest does:
//!
//! - a total byte cap ([`CappedWriter`]): past it, one line says so and later
//!   lines are dropped (the exit report is written apart from the log, so it
//!   always gets out);
//! - `virtio-queue`'s own `log` lines are not bridged into the log: they are
//!   all about the guest's queue set-up or ring contents (bad size, bad
//!   alignment, unreadable ring, bad available index) and some fire on every
//!   notification. The VMM's devices log the consequences themselves, rate
//!   limited.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tracing_subscriber::fmt::MakeWriter;

pub use vmm_api::config::DEFAULT_LOG_MAX_BYTES;

/// Crates whose `log` records are dropped (guest-driven, see the module docs).
pub const IGNORED_LOG_CRATES: &[&str] = &["virtio_queue"];

/// The byte budget shared by every writer a [`CappedWriter`] hands out.
#[derive(Debug)]
struct Budget {
    max: AtomicU64,
    used: AtomicU64,
    told: AtomicBool,
}

/// A [`MakeWriter`] over `W` that writes at most `max` bytes in total, then one
/// line saying the cap was reached, then nothing. Each log line is written in
/// one call (tracing's fmt layer formats the whole line first), so lines are
/// kept or dropped whole.
#[derive(Debug, Clone)]
pub struct CappedWriter<W> {
    inner: W,
    budget: Arc<Budget>,
}

impl<W> CappedWriter<W> {
    /// Caps `inner` at `max` bytes.
    pub fn new(inner: W, max: u64) -> Self {
        Self {
            inner,
            budget: Arc::new(Budget {
                max: AtomicU64::new(max),
                used: AtomicU64::new(0),
                told: AtomicBool::new(false),
            }),
        }
    }

    /// A handle to change the cap later (once the VM config is read).
    pub fn handle(&self) -> LogCap {
        LogCap(self.budget.clone())
    }
}

/// Changes the cap of a [`CappedWriter`].
#[derive(Debug, Clone)]
pub struct LogCap(Arc<Budget>);

impl LogCap {
    /// Sets the total cap (bytes already written count against it).
    pub fn set_max(&self, max: u64) {
        self.0.max.store(max, Ordering::SeqCst);
    }

    /// Bytes written so far.
    pub fn used(&self) -> u64 {
        self.0.used.load(Ordering::SeqCst)
    }
}

/// One line's writer.
pub struct CappedLine<W> {
    inner: W,
    budget: Arc<Budget>,
}

impl<W: Write> Write for CappedLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let b = &self.budget;
        let n = buf.len() as u64;
        let max = b.max.load(Ordering::SeqCst);
        // Reserve first, so concurrent lines never go past the cap together.
        let before = b.used.fetch_add(n, Ordering::SeqCst);
        if before.saturating_add(n) <= max {
            self.inner.write_all(buf)?;
        } else {
            b.used.fetch_sub(n, Ordering::SeqCst);
            if !b.told.swap(true, Ordering::SeqCst) {
                let _ = writeln!(
                    self.inner,
                    "reddog-vmm: the log reached its cap of {max} bytes; later lines are dropped"
                );
            }
        }
        // Dropped lines are reported as written: the logger must not retry or fail.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<'a, W> MakeWriter<'a> for CappedWriter<W>
where
    W: MakeWriter<'a>,
{
    type Writer = CappedLine<W::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        CappedLine {
            inner: self.inner.make_writer(),
            budget: self.budget.clone(),
        }
    }
}

/// Errors setting up the log.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// A logger was already installed.
    #[error("cannot install the VMM's logger: {0}")]
    Install(String),
}

/// Installs the VMM's logger: `level` and above, through `writer` capped at
/// `max_bytes`, with the `log` records of [`IGNORED_LOG_CRATES`] dropped.
/// Returns the handle that changes the cap.
pub fn init<W>(level: tracing::Level, writer: W, max_bytes: u64) -> Result<LogCap, LoggingError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let capped = CappedWriter::new(writer, max_bytes);
    let cap = capped.handle();
    let mut log =
        tracing_log::LogTracer::builder().with_max_level(tracing_log::log::LevelFilter::Trace);
    for c in IGNORED_LOG_CRATES {
        log = log.ignore_crate(*c);
    }
    log.init()
        .map_err(|e| LoggingError::Install(e.to_string()))?;
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(capped)
        .with_target(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|e| LoggingError::Install(e.to_string()))?;
    Ok(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    #[test]
    fn the_log_stops_at_its_cap_with_one_line_saying_so() {
        let sink = Sink::default();
        let w = CappedWriter::new(sink.clone(), 100);
        for _ in 0..1000 {
            w.make_writer().write_all(b"0123456789\n").expect("write");
        }
        let out = String::from_utf8(sink.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 10, "{out}");
        assert!(lines[..9].iter().all(|l| *l == "0123456789"));
        assert!(lines[9].contains("cap of 100 bytes"), "{out}");
        // A raised cap lets lines through again.
        w.handle().set_max(200);
        w.make_writer().write_all(b"more\n").expect("write");
        assert!(String::from_utf8_lossy(&sink.0.lock().expect("lock")).ends_with("more\n"));
        assert_eq!(w.handle().used(), 9 * 11 + 5);
    }
}
