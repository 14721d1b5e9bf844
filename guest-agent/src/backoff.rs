//! Capped exponential back-off with jitter, and the small PRNG behind it.

use std::time::Duration;

/// xorshift64*: not for secrets, only for spreading retries.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; 0 is replaced).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..=max`.
    pub fn below_or_eq(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            self.next_u64()
        } else {
            self.next_u64() % (max + 1)
        }
    }
}

/// 16 random bytes: `/dev/urandom`, else the clock and pid mixed.
pub fn random_bytes() -> [u8; 16] {
    use std::io::Read;
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return b;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut r = Rng::new(nanos ^ (u64::from(std::process::id()) << 32));
    for c in b.chunks_mut(8) {
        let v = r.next_u64().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    b
}

/// Exponential back-off: the n-th delay is `initial * 2^n`, capped at `max`,
/// then "equal jitter": a uniform value in `[d/2, d]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: Rng,
}

impl Backoff {
    /// Back-off from `initial` up to `max` (`max` is raised to `initial` if lower).
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng: Rng::new(seed),
        }
    }

    /// The un-jittered delay for the next attempt.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt; each call doubles the next ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
        let half = ms / 2;
        Duration::from_millis(half + self.rng.below_or_eq(ms - half))
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_jitters_within_bounds() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000), 7);
        let mut seen = Vec::new();
        for n in 0..8u32 {
            let ceiling = (100u64 << n).min(1000);
            let d = b.next_delay().as_millis() as u64;
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {n}: {d} ms");
            seen.push(d);
        }
        assert!(seen[4..].iter().all(|&d| d >= 500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        // Jitter spreads values.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 1);
        let v: std::collections::BTreeSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(v.len() > 10);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(7200), 3);
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(7200));
        }
        let mut z = Backoff::new(Duration::ZERO, Duration::ZERO, 3);
        assert_eq!(z.next_delay(), Duration::ZERO);
    }
}
