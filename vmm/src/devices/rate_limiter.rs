//! Token-bucket rate limiting of what a guest asks of a device (bytes and
//! operations), shared by virtio-blk and virtio-net.
//!
//! - [`TokenBuckets`]: the pure core over an injected [`Clock`]: admits a
//!   request or says how long to wait ([`Blocked::retry_after`]).
//! - [`RateLimiter`]: the core on the monotonic clock plus a timerfd armed
//!   when a request is refused; the device's event loop waits on the timerfd
//!   (no busy loop) and retries when it fires.
//!
//! A device asks *before* it takes work off its queue, and puts the work back
//! when refused (virtio-queue's `go_to_previous_position`), so nothing is
//! dropped: the guest just sees its requests complete at the limited rate.
//!
//! A request larger than a bucket's capacity would never fit; it is admitted
//! when the bucket is full and leaves the bucket in debt, which the refill
//! pays back before the next request. The long-run rate is exact either way.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_api::{RateLimit, TokenBucket};
use vmm_sys_util::timerfd::TimerFd;

/// Nanoseconds per second: tokens are held in nano-tokens so a refill over any
/// elapsed time adds an exact whole number of them (no rounding drift).
const NANOS: u128 = 1_000_000_000;

/// Shortest timer the device is woken by: shorter waits are rounded up (the
/// tokens keep accruing meanwhile, so only the burst granularity changes).
pub const MIN_TIMER: Duration = Duration::from_millis(1);

/// Errors setting up a rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// The limit's numbers are out of bounds.
    #[error("invalid rate limit: {0}")]
    Invalid(String),
    /// The timer could not be created.
    #[error("cannot create the rate limiter's timerfd: {0}; check the process's fd limit")]
    Timer(std::io::Error),
}

/// A monotonic time source (injected so the core is tested without sleeping).
pub trait Clock {
    /// Time since some fixed point; never goes backwards.
    fn now(&self) -> Duration;
}

/// The process's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock moved by hand (tests; shared between clones).
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// A request was refused: retry after this long (the device's timer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    /// How long until the buckets hold enough for the refused request.
    pub retry_after: Duration,
}

/// One bucket, in nano-tokens (tokens x 10^9). May go negative (debt) after an
/// oversized request.
#[derive(Debug, Clone)]
struct Bucket {
    rate: u128,
    capacity: i128,
    level: i128,
    last: Duration,
}

impl Bucket {
    fn new(b: &TokenBucket, now: Duration) -> Self {
        let capacity = i128::from(b.capacity()) * NANOS as i128;
        Self {
            rate: u128::from(b.per_second),
            capacity,
            // Starts full: a VM boots with its burst available.
            level: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.last).as_nanos();
        self.last = now;
        // Bounded: rate <= 2^40 and elapsed fits u64 nanoseconds, so the product fits i128.
        let added = i128::try_from(elapsed.saturating_mul(self.rate)).unwrap_or(i128::MAX);
        self.level = self.level.saturating_add(added).min(self.capacity);
    }

    /// Nano-tokens needed before `n` tokens may be taken: `n`, or a full
    /// bucket when `n` exceeds the capacity.
    fn needed(&self, n: u64) -> i128 {
        (i128::from(n) * NANOS as i128).min(self.capacity)
    }

    /// How long until `n` tokens may be taken (zero: now).
    fn wait_for(&self, n: u64) -> Duration {
        let short = self.needed(n) - self.level;
        if short <= 0 {
            return Duration::ZERO;
        }
        // Round up so the retry finds the tokens there.
        let ns = (short as u128).div_ceil(self.rate);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn take(&mut self, n: u64) {
        self.level -= i128::from(n) * NANOS as i128;
    }
}

/// The pure core: a bytes bucket and an operations bucket, either optional.
#[derive(Debug, Clone)]
pub struct TokenBuckets<C: Clock> {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    clock: C,
}

impl<C: Clock> TokenBuckets<C> {
    /// Buckets for `limit` on `clock`, both starting full.
    pub fn new(limit: &RateLimit, clock: C) -> Result<Self, RateLimiterError> {
        limit.validate().map_err(RateLimiterError::Invalid)?;
        let now = clock.now();
        Ok(Self {
            bytes: limit.bytes.as_ref().map(|b| Bucket::new(b, now)),
            ops: limit.ops.as_ref().map(|b| Bucket::new(b, now)),
            clock,
        })
    }

    /// Whether neither bucket is set (every request is admitted).
    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// Admits a request of `bytes` bytes and `ops` operations (taking the
    /// tokens from both buckets), or refuses it whole, taking nothing.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> Result<(), Blocked> {
        let now = self.clock.now();
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bytes, bytes), (&mut self.ops, ops)] {
            if let Some(b) = bucket {
                b.refill(now);
                wait = wait.max(b.wait_for(n));
            }
        }
        if !wait.is_zero() {
            return Err(Blocked { retry_after: wait });
        }
        for (bucket, n) in [(&mut self.bytes, bytes), (&mut self.ops, ops)] {
            if let Some(b) = bucket {
                b.take(n);
            }
        }
        Ok(())
    }
}

/// [`TokenBuckets`] on the monotonic clock, with the timerfd a device's event
/// loop waits on after a refusal.
pub struct RateLimiter {
    buckets: TokenBuckets<MonotonicClock>,
    /// None when unlimited (no fd spent).
    timer: Option<TimerFd>,
    blocked: bool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("buckets", &self.buckets)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter for `limit` (`None` or empty: unlimited, no timerfd).
    pub fn new(limit: Option<&RateLimit>) -> Result<Self, RateLimiterError> {
        let buckets = TokenBuckets::new(
            &limit.copied().unwrap_or_default(),
            MonotonicClock::default(),
        )?;
        let timer = if buckets.is_unlimited() {
            None
        } else {
            Some(TimerFd::new().map_err(|e| RateLimiterError::Timer(e.into()))?)
        };
        Ok(Self {
            buckets,
            timer,
            blocked: false,
        })
    }

    /// Whether a refused request waits for the timer (the device should not
    /// take work off its queue until [`RateLimiter::timer_fired`]).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// As [`TokenBuckets::consume`]; a refusal arms the timer for
    /// `retry_after` (at least [`MIN_TIMER`]) and marks the limiter blocked.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> Result<(), Blocked> {
        if self.blocked {
            return Err(Blocked {
                retry_after: MIN_TIMER,
            });
        }
        let r = self.buckets.consume(bytes, ops);
        if let Err(b) = &r {
            if let Some(t) = self.timer.as_mut() {
                if let Err(e) = t.reset(b.retry_after.max(MIN_TIMER), None) {
                    // Not guest-triggerable (a kernel refusal): proceed unlimited
                    // rather than stall the device forever.
                    tracing::warn!("rate limiter: cannot arm the timer: {e}; not limiting");
                    return Ok(());
                }
                self.blocked = true;
            }
        }
        r
    }

    /// The timerfd fired: clears it and unblocks (the device then retries).
    pub fn timer_fired(&mut self) {
        if let Some(t) = self.timer.as_mut() {
            // Disarming also zeroes the expiry count (the fd stops being
            // readable) without a read that could block if called spuriously.
            if let Err(e) = t.clear() {
                tracing::warn!("rate limiter: cannot clear the timer: {e}");
            }
        }
        self.blocked = false;
    }

    /// The timerfd to wait on (None when unlimited).
    pub fn timer_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(AsRawFd::as_raw_fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    fn limit(bytes: Option<(u64, Option<u64>)>, ops: Option<(u64, Option<u64>)>) -> RateLimit {
        let b = |(per_second, burst)| TokenBucket { per_second, burst };
        RateLimit {
            bytes: bytes.map(b),
            ops: ops.map(b),
        }
    }

    #[test]
    fn unlimited_admits_everything() {
        let mut t = TokenBuckets::new(&RateLimit::default(), ManualClock::default()).expect("ok");
        assert!(t.is_unlimited());
        for _ in 0..1000 {
            t.consume(u64::MAX, u64::MAX).expect("admitted");
        }
    }

    #[test]
    fn bytes_are_held_to_the_rate_after_the_burst() {
        let clock = ManualClock::default();
        // 1000 B/s, burst 100.
        let mut t =
            TokenBuckets::new(&limit(Some((1000, Some(100))), None), clock.clone()).expect("ok");
        t.consume(60, 1).expect("within the burst");
        t.consume(40, 1).expect("the rest of the burst");
        let b = t.consume(10, 1).expect_err("empty");
        assert_eq!(b.retry_after, Duration::from_millis(10));
        clock.advance(Duration::from_millis(9));
        let b = t.consume(10, 1).expect_err("still short");
        assert_eq!(b.retry_after, Duration::from_millis(1));
        clock.advance(Duration::from_millis(1));
        t.consume(10, 1).expect("refilled");
        // The refill is capped at the burst.
        clock.advance(Duration::from_secs(100));
        t.consume(100, 1).expect("full");
        assert!(t.consume(1, 1).is_err());
    }

    #[test]
    fn a_refused_request_takes_nothing_from_either_bucket() {
        let clock = ManualClock::default();
        let mut t = TokenBuckets::new(
            &limit(Some((1000, Some(100))), Some((10, Some(2)))),
            clock.clone(),
        )
        .expect("ok");
        t.consume(100, 1).expect("burst");
        assert!(t.consume(1, 1).is_err(), "bytes empty");
        t.consume(0, 1)
            .expect("the ops bucket still holds its second token");
        assert!(t.consume(0, 1).is_err(), "ops empty");
        // Ops refill at 10/s: 100 ms per op; bytes need 1 ms per byte.
        let b = t.consume(50, 1).expect_err("both short");
        assert_eq!(b.retry_after, Duration::from_millis(100), "the longer wait");
    }

    #[test]
    fn an_oversized_request_waits_for_a_full_bucket_then_goes_into_debt() {
        let clock = ManualClock::default();
        let mut t =
            TokenBuckets::new(&limit(Some((1000, Some(100))), None), clock.clone()).expect("ok");
        // 1000 bytes > capacity 100: admitted on a full bucket.
        t.consume(1000, 1).expect("full bucket admits it");
        // Now 900 in debt: the next 1 byte waits 901 ms.
        let b = t.consume(1, 1).expect_err("debt");
        assert_eq!(b.retry_after, Duration::from_millis(901));
        clock.advance(Duration::from_millis(901));
        t.consume(1, 1).expect("debt repaid");
    }

    #[test]
    fn the_long_run_rate_is_exact() {
        // Serve 4 KiB requests as fast as the limiter admits them, on a simulated
        // clock: 10 s at 1 MiB/s moves 10 MiB plus the burst, to the request.
        let clock = ManualClock::default();
        let rate = 1 << 20;
        let mut t = TokenBuckets::new(
            &limit(Some((rate, None)), Some((10_000, None))),
            clock.clone(),
        )
        .expect("ok");
        let mut moved = 0u64;
        let end = Duration::from_secs(10);
        while clock.now() < end {
            match t.consume(4096, 1) {
                Ok(()) => moved += 4096,
                Err(b) => clock.advance(b.retry_after.max(MIN_TIMER)),
            }
        }
        let expect = rate * 10 + rate;
        assert!(
            moved.abs_diff(expect) <= 2 * 4096,
            "moved {moved}, expected about {expect}"
        );
    }

    #[test]
    fn the_limiter_blocks_until_its_timer_fires() {
        let mut r = RateLimiter::new(Some(&limit(None, Some((100, Some(1)))))).expect("ok");
        let fd = r.timer_fd().expect("a timerfd");
        r.consume(0, 1).expect("the burst");
        let b = r.consume(0, 1).expect_err("empty");
        assert!(b.retry_after <= Duration::from_millis(10), "{b:?}");
        assert!(r.is_blocked());
        // While blocked, nothing is admitted even once the tokens are back.
        std::thread::sleep(Duration::from_millis(20));
        assert!(r.consume(0, 1).is_err());
        let epoll = Epoll::new().expect("epoll");
        epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
            .expect("add");
        let mut evs = [EpollEvent::default()];
        let n = epoll.wait(1000, &mut evs).expect("wait");
        assert_eq!(n, 1, "the timerfd became readable");
        r.timer_fired();
        assert!(!r.is_blocked());
        let n = epoll.wait(0, &mut evs).expect("wait");
        assert_eq!(
            n, 0,
            "the fired timer was cleared (an epoll loop would spin)"
        );
        r.consume(0, 1).expect("refilled");
        assert!(RateLimiter::new(None).expect("ok").timer_fd().is_none());
    }
}
