//! Whether one instance is a member of one endpoint: a pure state machine fed
//! with probe results and lifecycle facts, answering with the membership
//! changes the caller applies to the load balancer and reports as events.
//!
//! An instance joins after `successes` consecutive good probes, leaves after
//! `failures` consecutive failed ones, and leaves at once when it drains
//! (a planned stop), when its VMM exits or when it is removed. After a drain
//! or a VMM exit it does not rejoin until it is [`MemberInput::Started`] again,
//! so a late probe answer from the old VMM cannot put it back.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::spec::ProbeSpec;

/// What happened to the instance, as the caller saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberInput {
    /// A probe was answered with 2xx or 3xx.
    ProbeOk,
    /// A probe failed.
    ProbeFailed {
        /// Why (for the event and the log).
        why: String,
    },
    /// The instance is about to stop (planned): drain it. Prefer
    /// [`Membership::drain`], which also says when shutdown may proceed.
    Drain,
    /// The instance's VMM ended.
    VmmExited,
    /// The instance is gone for good.
    Removed,
    /// A new VMM of the instance started: probing begins again.
    Started,
}

/// Why a member left its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// `failures` consecutive probes failed.
    ProbeFailed,
    /// A planned stop: no new connections.
    Draining,
    /// Its VMM ended.
    VmmExited,
    /// The instance was removed.
    Removed,
}

impl LeaveReason {
    /// The name used in events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveReason::ProbeFailed => "probe_failed",
            LeaveReason::Draining => "draining",
            LeaveReason::VmmExited => "vmm_exited",
            LeaveReason::Removed => "removed",
        }
    }
}

/// A change of membership the caller must apply (rebuild the load balancer)
/// and report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// The instance now takes new connections.
    Joined,
    /// The instance takes no new connections.
    Left {
        /// Why.
        reason: LeaveReason,
        /// The last probe's failure, for [`LeaveReason::ProbeFailed`].
        why: Option<String>,
    },
}

/// Where the instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Running, not (yet) a member: `good` consecutive good probes so far.
    Waiting {
        /// Consecutive good probes.
        good: u8,
    },
    /// A member: `bad` consecutive failed probes so far.
    Member {
        /// Consecutive failed probes.
        bad: u8,
    },
    /// Drained before a planned stop; rejoins only after `Started`.
    Draining,
    /// Its VMM ended; rejoins only after `Started`.
    Down,
    /// Removed; never rejoins.
    Removed,
}

/// One instance's membership of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    successes: u8,
    failures: u8,
    phase: Phase,
}

/// When a drained instance may be shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    /// Shutdown may proceed at this time at the latest, whatever is still
    /// open (the drain timeout after the instance left the load balancer).
    pub deadline: Instant,
}

impl DrainPlan {
    /// Whether the caller may shut the instance down now: the deadline has
    /// passed, or the caller knows no connection to it is open
    /// (`open_connections`, e.g. from conntrack, `None` when unknown).
    pub fn may_proceed(&self, now: Instant, open_connections: Option<usize>) -> bool {
        now >= self.deadline || open_connections == Some(0)
    }
}

impl Membership {
    /// A just-started instance, not a member, with the probe's thresholds
    /// (a validated [`ProbeSpec`]; a zero count is taken as 1).
    pub fn new(probe: &ProbeSpec) -> Self {
        Self {
            successes: probe.successes.max(1),
            failures: probe.failures.max(1),
            phase: Phase::Waiting { good: 0 },
        }
    }

    /// Where the instance stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the instance is in the load balancer's set.
    pub fn is_member(&self) -> bool {
        matches!(self.phase, Phase::Member { .. })
    }

    /// Whether the caller should keep probing it (running and not draining).
    pub fn wants_probes(&self) -> bool {
        matches!(self.phase, Phase::Waiting { .. } | Phase::Member { .. })
    }

    /// Feeds one input; returns the change to apply, if any.
    pub fn step(&mut self, input: MemberInput) -> Option<MemberChange> {
        let was_member = self.is_member();
        let left = |reason| MemberChange::Left { reason, why: None };
        match (self.phase, input) {
            (Phase::Removed, _) => None,
            (_, MemberInput::Removed) => {
                self.phase = Phase::Removed;
                was_member.then(|| left(LeaveReason::Removed))
            }
            (_, MemberInput::VmmExited) => {
                self.phase = Phase::Down;
                was_member.then(|| left(LeaveReason::VmmExited))
            }
            (Phase::Down | Phase::Draining, MemberInput::Started) => {
                self.phase = Phase::Waiting { good: 0 };
                None
            }
            (_, MemberInput::Started) => None,
            (Phase::Down, MemberInput::Drain) => None,
            (_, MemberInput::Drain) => {
                self.phase = Phase::Draining;
                was_member.then(|| left(LeaveReason::Draining))
            }
            // Probe results count only while running and not draining.
            (Phase::Down | Phase::Draining, _) => None,
            (Phase::Waiting { good }, MemberInput::ProbeOk) => {
                let good = good.saturating_add(1);
                if good >= self.successes {
                    self.phase = Phase::Member { bad: 0 };
                    Some(MemberChange::Joined)
                } else {
                    self.phase = Phase::Waiting { good };
                    None
                }
            }
            (Phase::Waiting { .. }, MemberInput::ProbeFailed { .. }) => {
                self.phase = Phase::Waiting { good: 0 };
                None
            }
            (Phase::Member { .. }, MemberInput::ProbeOk) => {
                self.phase = Phase::Member { bad: 0 };
                None
            }
            (Phase::Member { bad }, MemberInput::ProbeFailed { why }) => {
                let bad = bad.saturating_add(1);
                if bad >= self.failures {
                    self.phase = Phase::Waiting { good: 0 };
                    Some(MemberChange::Left {
                        reason: LeaveReason::ProbeFailed,
                        why: Some(why),
                    })
                } else {
                    self.phase = Phase::Member { bad };
                    None
                }
            }
        }
    }

    /// Drains the instance before a planned stop: it leaves the load balancer
    /// at once (no new connections), and the plan says when shutdown may
    /// proceed: at once if it was not a member (nothing to drain), else after
    /// `timeout` or when its connections are gone.
    pub fn drain(&mut self, now: Instant, timeout: Duration) -> (Option<MemberChange>, DrainPlan) {
        let change = self.step(MemberInput::Drain);
        let deadline = if change.is_some() { now + timeout } else { now };
        (change, DrainPlan { deadline })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(successes: u8, failures: u8) -> ProbeSpec {
        ProbeSpec {
            successes,
            failures,
            ..ProbeSpec::default()
        }
    }

    fn fail() -> MemberInput {
        MemberInput::ProbeFailed {
            why: "connection refused".into(),
        }
    }

    #[test]
    fn joins_on_the_first_good_probe_by_default() {
        let mut m = Membership::new(&ProbeSpec::default());
        assert!(!m.is_member());
        assert!(m.wants_probes());
        assert_eq!(m.step(fail()), None);
        assert_eq!(m.step(MemberInput::ProbeOk), Some(MemberChange::Joined));
        assert!(m.is_member());
        assert_eq!(m.step(MemberInput::ProbeOk), None, "joins once");
    }

    #[test]
    fn joins_only_after_consecutive_successes() {
        let mut m = Membership::new(&probe(3, 1));
        assert_eq!(m.step(MemberInput::ProbeOk), None);
        assert_eq!(m.step(MemberInput::ProbeOk), None);
        assert_eq!(m.step(fail()), None, "a failure resets the count");
        assert_eq!(m.step(MemberInput::ProbeOk), None);
        assert_eq!(m.step(MemberInput::ProbeOk), None);
        assert_eq!(m.step(MemberInput::ProbeOk), Some(MemberChange::Joined));
    }

    #[test]
    fn leaves_after_consecutive_failures_and_can_rejoin() {
        let mut m = Membership::new(&probe(1, 2));
        m.step(MemberInput::ProbeOk);
        assert_eq!(m.step(fail()), None);
        assert_eq!(
            m.step(MemberInput::ProbeOk),
            None,
            "a success resets the count"
        );
        assert_eq!(m.step(fail()), None);
        assert_eq!(
            m.step(fail()),
            Some(MemberChange::Left {
                reason: LeaveReason::ProbeFailed,
                why: Some("connection refused".into())
            })
        );
        assert!(!m.is_member());
        assert!(m.wants_probes(), "still probed, to rejoin");
        assert_eq!(m.step(MemberInput::ProbeOk), Some(MemberChange::Joined));
    }

    #[test]
    fn a_drained_member_leaves_at_once_and_rejoins_only_after_a_start() {
        let mut m = Membership::new(&ProbeSpec::default());
        m.step(MemberInput::ProbeOk);
        let now = Instant::now();
        let (change, plan) = m.drain(now, Duration::from_secs(5));
        assert_eq!(
            change,
            Some(MemberChange::Left {
                reason: LeaveReason::Draining,
                why: None
            })
        );
        assert!(!m.wants_probes());
        assert!(!plan.may_proceed(now, None));
        assert!(!plan.may_proceed(now + Duration::from_secs(4), Some(3)));
        assert!(plan.may_proceed(now + Duration::from_secs(1), Some(0)));
        assert!(plan.may_proceed(now + Duration::from_secs(5), Some(3)));
        // A late good probe does not bring it back.
        assert_eq!(m.step(MemberInput::ProbeOk), None);
        assert_eq!(m.phase(), Phase::Draining);
        assert_eq!(m.step(MemberInput::Drain), None, "leaves once");
        assert_eq!(m.step(MemberInput::Started), None);
        assert_eq!(m.step(MemberInput::ProbeOk), Some(MemberChange::Joined));
    }

    #[test]
    fn draining_a_non_member_may_shut_down_at_once() {
        let mut m = Membership::new(&ProbeSpec::default());
        let now = Instant::now();
        let (change, plan) = m.drain(now, Duration::from_secs(30));
        assert_eq!(change, None);
        assert!(plan.may_proceed(now, None));
        assert_eq!(m.step(MemberInput::ProbeOk), None, "no join while draining");
    }

    #[test]
    fn a_vmm_exit_leaves_and_waits_for_the_next_start() {
        let mut m = Membership::new(&ProbeSpec::default());
        m.step(MemberInput::ProbeOk);
        assert_eq!(
            m.step(MemberInput::VmmExited),
            Some(MemberChange::Left {
                reason: LeaveReason::VmmExited,
                why: None
            })
        );
        assert_eq!(
            m.step(MemberInput::ProbeOk),
            None,
            "a stale probe is ignored"
        );
        assert_eq!(m.step(MemberInput::VmmExited), None);
        assert_eq!(m.step(MemberInput::Started), None);
        assert_eq!(m.step(MemberInput::ProbeOk), Some(MemberChange::Joined));
        // A non-member's exit says nothing.
        let mut n = Membership::new(&ProbeSpec::default());
        assert_eq!(n.step(MemberInput::VmmExited), None);
    }

    #[test]
    fn removal_is_final() {
        let mut m = Membership::new(&ProbeSpec::default());
        m.step(MemberInput::ProbeOk);
        assert_eq!(
            m.step(MemberInput::Removed),
            Some(MemberChange::Left {
                reason: LeaveReason::Removed,
                why: None
            })
        );
        for input in [
            MemberInput::Started,
            MemberInput::ProbeOk,
            MemberInput::Removed,
            MemberInput::VmmExited,
        ] {
            assert_eq!(m.step(input), None);
        }
        assert_eq!(m.phase(), Phase::Removed);
        // A drained instance that is then removed does not leave twice.
        let mut d = Membership::new(&ProbeSpec::default());
        d.step(MemberInput::ProbeOk);
        d.step(MemberInput::Drain);
        assert_eq!(d.step(MemberInput::Removed), None);
    }

    #[test]
    fn reasons_have_their_wire_names() {
        for (r, s) in [
            (LeaveReason::ProbeFailed, "probe_failed"),
            (LeaveReason::Draining, "draining"),
            (LeaveReason::VmmExited, "vmm_exited"),
            (LeaveReason::Removed, "removed"),
        ] {
            assert_eq!(r.as_str(), s);
            assert_eq!(serde_json::to_value(r).expect("serializes"), s);
        }
    }
}
