//! Health and restart policy: the timings ([`HealthPolicy`]) and the decision
//! after a failure ([`FailureHistory::record`]): restart after a backoff, or
//! give up (the crash-loop guard). Pure functions of time and failures, so
//! they are unit-tested without a task, a clock or a VMM.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Health, restart and stop timings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthPolicy {
    /// Heartbeat intervals without a frame before the guest counts as
    /// unresponsive.
    pub missed_heartbeats: u32,
    /// Added to `missed_heartbeats` intervals.
    pub heartbeat_grace: Duration,
    /// Time from VMM start (or re-adoption) to the guest's hello.
    pub boot_timeout: Duration,
    /// First restart delay; doubles per recent failure.
    pub backoff_initial: Duration,
    /// Longest restart delay.
    pub backoff_max: Duration,
    /// Failures within `crash_loop_window` that mark an instance failed.
    pub crash_loop_failures: u32,
    /// The crash-loop window.
    pub crash_loop_window: Duration,
    /// How long a graceful stop may take before the VMM is killed.
    pub stop_grace: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            missed_heartbeats: 3,
            heartbeat_grace: Duration::from_secs(1),
            boot_timeout: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            crash_loop_failures: 3,
            crash_loop_window: Duration::from_secs(300),
            stop_grace: Duration::from_secs(10),
        }
    }
}

impl HealthPolicy {
    /// How long without a frame means unresponsive, for this heartbeat interval.
    pub fn heartbeat_timeout(&self, interval_ms: u32) -> Duration {
        Duration::from_millis(u64::from(interval_ms)) * self.missed_heartbeats
            + self.heartbeat_grace
    }
}
/// What to do after a VMM failed (exited, never started, stopped answering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start it again after `delay`.
    Restart {
        /// The backoff: `backoff_initial` doubled per recent failure but the
        /// first, at most `backoff_max`.
        delay: Duration,
        /// Failures inside the crash-loop window, this one included.
        recent: u32,
    },
    /// The crash-loop guard tripped: do not restart until the goal changes.
    GiveUp {
        /// Failures inside the crash-loop window, this one included.
        recent: u32,
    },
}

/// The failures an instance had, as times on a monotonic scale in
/// milliseconds (the task's clock; stored in the instance record as ages so
/// they survive an agent restart). Only those inside the crash-loop window
/// are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureHistory {
    at_ms: VecDeque<u64>,
}

impl FailureHistory {
    /// A history from failure times (oldest first or not; they are sorted).
    pub fn from_times(mut at_ms: Vec<u64>) -> Self {
        at_ms.sort_unstable();
        Self {
            at_ms: at_ms.into(),
        }
    }

    /// The failure times kept, oldest first.
    pub fn times(&self) -> impl Iterator<Item = u64> + '_ {
        self.at_ms.iter().copied()
    }

    /// Failures inside the window at `now_ms`.
    pub fn recent(&self, policy: &HealthPolicy, now_ms: u64) -> u32 {
        let window = duration_ms(policy.crash_loop_window);
        let n = self
            .at_ms
            .iter()
            .filter(|t| now_ms.saturating_sub(**t) < window)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Forgets every failure (a new goal incarnation retries afresh).
    pub fn clear(&mut self) {
        self.at_ms.clear();
    }

    /// Records a failure at `now_ms`, drops those outside the window, and
    /// decides what happens next.
    pub fn record(&mut self, policy: &HealthPolicy, now_ms: u64) -> Verdict {
        let window = duration_ms(policy.crash_loop_window);
        self.at_ms.push_back(now_ms);
        while self
            .at_ms
            .front()
            .is_some_and(|t| now_ms.saturating_sub(*t) >= window)
        {
            self.at_ms.pop_front();
        }
        let recent = u32::try_from(self.at_ms.len()).unwrap_or(u32::MAX);
        if recent >= policy.crash_loop_failures {
            return Verdict::GiveUp { recent };
        }
        let delay = policy
            .backoff_initial
            .saturating_mul(1 << recent.saturating_sub(1).min(20))
            .min(policy.backoff_max);
        Verdict::Restart { delay, recent }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5),
            crash_loop_failures: 4,
            crash_loop_window: Duration::from_secs(60),
            ..HealthPolicy::default()
        }
    }

    #[test]
    fn backoff_doubles_per_recent_failure_up_to_the_maximum() {
        let p = HealthPolicy {
            crash_loop_failures: 10,
            ..policy()
        };
        let mut h = FailureHistory::default();
        let delays: Vec<_> = (0..5)
            .map(|i| match h.record(&p, 1000 + i) {
                Verdict::Restart { delay, .. } => delay.as_secs(),
                Verdict::GiveUp { .. } => panic!("gave up too early"),
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
    }

    #[test]
    fn the_guard_trips_at_n_failures_inside_the_window_only() {
        let p = policy();
        let mut h = FailureHistory::default();
        // Three failures a minute apart never trip it: each is alone.
        for i in 0..3 {
            assert_eq!(
                h.record(&p, i * 60_000),
                Verdict::Restart {
                    delay: Duration::from_secs(1),
                    recent: 1
                }
            );
        }
        // Four inside one window do.
        let mut h = FailureHistory::default();
        let v: Vec<_> = (0..4).map(|i| h.record(&p, 10_000 + i * 1000)).collect();
        assert!(matches!(v[2], Verdict::Restart { recent: 3, .. }));
        assert_eq!(v[3], Verdict::GiveUp { recent: 4 });
        assert_eq!(h.recent(&p, 13_000), 4);
        // The window slides: 61 s later, they are all old.
        assert_eq!(h.recent(&p, 74_000), 0);
    }

    #[test]
    fn a_history_survives_as_times() {
        let p = policy();
        let mut h = FailureHistory::default();
        h.record(&p, 5);
        h.record(&p, 7);
        let mut times: Vec<u64> = h.times().collect();
        times.reverse();
        let again = FailureHistory::from_times(times);
        assert_eq!(again, h);
        h.clear();
        assert_eq!(h.recent(&p, 8), 0);
    }

    #[test]
    fn a_clock_that_goes_back_counts_the_failure_as_recent() {
        let p = policy();
        let mut h = FailureHistory::from_times(vec![50_000]);
        assert_eq!(
            h.record(&p, 10),
            Verdict::Restart {
                delay: Duration::from_secs(2),
                recent: 2
            }
        );
    }
}
