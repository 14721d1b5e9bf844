//! Boot timer: the guest writes [`vmm_api::platform::BOOT_TIMER_MAGIC`] to
//! [`vmm_api::platform::BOOT_TIMER_PORT`]; the first such write records the
//! microseconds since the VMM's `main` started. Later writes are ignored, so a
//! guest cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::OnceLock;
use std::time::Instant;

use vmm_api::platform;

/// Records the guest's "booted" moment.
pub struct BootTimer {
    start: Instant,
    /// Microseconds + 1 (0 = not yet).
    booted: AtomicU64,
    /// Told the boot time once it is recorded (the control socket's event).
    notify: OnceLock<Sender<u64>>,
}

impl BootTimer {
    /// A timer counting from `start` (the VMM's `main`).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            booted: AtomicU64::new(0),
            notify: OnceLock::new(),
        }
    }

    /// A guest write.
    pub fn write(&self, value: u8) {
        if value != platform::BOOT_TIMER_MAGIC {
            return;
        }
        let us = self.start.elapsed().as_micros() as u64;
        if self
            .booted
            .compare_exchange(0, us + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            tracing::info!(
                boot_time_us = us,
                "guest boot time: {us} us since VMM start"
            );
            if let Some(tx) = self.notify.get() {
                // Never blocks: an unbounded channel.
                let _ = tx.send(us);
            }
        }
    }

    /// Sends the boot time to `tx` when the guest writes it (only the first
    /// call takes effect; a boot that already happened is not sent).
    pub fn notify_on_boot(&self, tx: Sender<u64>) {
        let _ = self.notify.set(tx);
    }

    /// Microseconds from VMM start to the guest's first magic write, if any.
    pub fn boot_time_us(&self) -> Option<u64> {
        match self.booted.load(Ordering::SeqCst) {
            0 => None,
            v => Some(v - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_magic_write_wins() {
        let t = BootTimer::new(Instant::now());
        t.write(1);
        assert_eq!(t.boot_time_us(), None);
        t.write(platform::BOOT_TIMER_MAGIC);
        let first = t.boot_time_us().expect("recorded");
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.write(platform::BOOT_TIMER_MAGIC);
        assert_eq!(t.boot_time_us(), Some(first));
    }
}
