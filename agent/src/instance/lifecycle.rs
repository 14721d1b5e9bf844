//! The instance lifecycle: states, the transition table and the recorded
//! history. The state lives in a private field and changes only through
//! [`Lifecycle::go`], which consults [`InstanceState::can_go_to`]: an illegal
//! transition is refused and never reaches the recorded state.
//!
//! `Paused` is a state like the others, and the lifecycle remembers the state
//! it was entered from ([`Lifecycle::resume_to`]): [`Lifecycle::resume`] goes
//! back there, and what the guest says while its VM is parked moves that state
//! instead of the current one ([`Lifecycle::go_or_defer`]).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Accepted, nothing done yet.
    Pending,
    /// Creating the OS, resource and role disks.
    PreparingDisks,
    /// The VMM is being spawned; the guest has not said hello.
    Starting,
    /// The guest agent said hello; the role is not ready.
    Booted,
    /// The role is ready.
    Ready,
    /// The VMM's vCPUs are parked (through the API, or by whoever holds the
    /// VMM's control socket); heartbeats are not expected until it resumes.
    Paused,
    /// Heartbeats stopped (or the guest never said hello); about to restart.
    Unhealthy,
    /// Waiting out the backoff before starting again.
    Restarting,
    /// Being stopped (graceful, then forced).
    Stopping,
    /// Stopped; its resources are released.
    Stopped,
    /// Given up: disks could not be made, or the crash-loop guard tripped.
    Failed,
}

impl InstanceState {
    /// Every state.
    pub const ALL: [InstanceState; 11] = [
        Self::Pending,
        Self::PreparingDisks,
        Self::Starting,
        Self::Booted,
        Self::Ready,
        Self::Paused,
        Self::Unhealthy,
        Self::Restarting,
        Self::Stopping,
        Self::Stopped,
        Self::Failed,
    ];

    /// The transition table.
    pub const fn can_go_to(self, to: InstanceState) -> bool {
        use InstanceState::*;
        matches!(
            (self, to),
            // New, or re-read from the state directory after an agent restart:
            // prepare disks, start over kept disks, or re-adopt a live VMM.
            (Pending, PreparingDisks | Starting | Booted | Stopped | Failed)
                | (PreparingDisks, Starting | Failed | Stopped)
                | (Starting, Booted | Paused | Unhealthy | Restarting | Stopping)
                | (Booted, Ready | Paused | Unhealthy | Restarting | Stopping)
                // Ready -> Booted: the role exited or the guest rebooted.
                | (Ready, Booted | Paused | Unhealthy | Restarting | Stopping)
                // Resumed: back where it was; or the VMM exited while paused.
                | (Paused, Starting | Booted | Ready | Restarting | Stopping)
                | (Unhealthy, Restarting | Stopping)
                | (Restarting, Starting | Failed | Stopping)
                | (Stopping, Stopped)
                // Stopped/Failed -> Pending: the goal changed the spec.
                | (Stopped, Pending)
                | (Failed, Pending | Stopped)
        )
    }

    /// Whether a VMM may be running in this state.
    pub const fn vmm_may_run(self) -> bool {
        matches!(
            self,
            Self::Starting
                | Self::Booted
                | Self::Ready
                | Self::Paused
                | Self::Unhealthy
                | Self::Stopping
        )
    }

    /// The name used in JSON and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::PreparingDisks => "preparing_disks",
            Self::Starting => "starting",
            Self::Booted => "booted",
            Self::Ready => "ready",
            Self::Paused => "paused",
            Self::Unhealthy => "unhealthy",
            Self::Restarting => "restarting",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One recorded change of state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Before.
    pub from: InstanceState,
    /// After.
    pub to: InstanceState,
    /// Why, for humans.
    pub reason: String,
    /// When (wall clock, ms since the Unix epoch).
    pub at_unix_ms: u64,
}

/// A refused transition (a bug in the caller: the state is unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "illegal instance transition {from} -> {to} ({reason}); this is an agent bug, please report it"
)]
pub struct IllegalTransition {
    /// The current state.
    pub from: InstanceState,
    /// The refused target.
    pub to: InstanceState,
    /// The reason that was given.
    pub reason: String,
}

/// How many transitions an instance keeps (older ones are dropped).
pub const HISTORY_LEN: usize = 64;

/// An instance's state and its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    state: InstanceState,
    since_unix_ms: u64,
    history: VecDeque<Transition>,
    /// While `Paused`: the state to go back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resume_to: Option<InstanceState>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A new instance, [`InstanceState::Pending`].
    pub fn new() -> Self {
        Self {
            state: InstanceState::Pending,
            since_unix_ms: crate::util::now_unix_ms(),
            history: VecDeque::new(),
            resume_to: None,
        }
    }

    /// Continues a recorded history (after an agent restart) from Pending.
    pub fn from_history(history: Vec<Transition>) -> Self {
        let mut l = Self::new();
        l.history = history.into();
        while l.history.len() > HISTORY_LEN {
            l.history.pop_front();
        }
        l
    }

    /// The current state.
    pub fn state(&self) -> InstanceState {
        self.state
    }

    /// When the current state was entered (ms since the Unix epoch).
    pub fn since_unix_ms(&self) -> u64 {
        self.since_unix_ms
    }

    /// The recorded transitions, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Transition> {
        self.history.iter()
    }

    /// Moves to `to` if the table allows it and records why.
    pub fn go(
        &mut self,
        to: InstanceState,
        reason: impl Into<String>,
    ) -> Result<Transition, IllegalTransition> {
        let reason = reason.into();
        if !self.state.can_go_to(to) {
            return Err(IllegalTransition {
                from: self.state,
                to,
                reason,
            });
        }
        let t = Transition {
            from: self.state,
            to,
            reason,
            at_unix_ms: crate::util::now_unix_ms(),
        };
        self.resume_to = (to == InstanceState::Paused).then_some(self.state);
        self.state = to;
        self.since_unix_ms = t.at_unix_ms;
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(t.clone());
        Ok(t)
    }

    /// While `Paused`, the state [`Lifecycle::resume`] goes back to.
    pub fn resume_to(&self) -> Option<InstanceState> {
        self.resume_to
    }

    /// Whether the instance is `Paused`.
    pub fn is_paused(&self) -> bool {
        self.state == InstanceState::Paused
    }

    /// The state, or while paused the one it resumes to.
    pub fn effective(&self) -> InstanceState {
        self.resume_to.unwrap_or(self.state)
    }

    /// Leaves `Paused` for the state it was entered from.
    pub fn resume(&mut self, reason: impl Into<String>) -> Result<Transition, IllegalTransition> {
        match self.resume_to {
            Some(to) => self.go(to, reason),
            None => Err(IllegalTransition {
                from: self.state,
                to: self.state,
                reason: format!("{}: not paused", reason.into()),
            }),
        }
    }

    /// A transition asked for by what the guest or the VMM said: applied now,
    /// or while paused to the state the instance resumes to (a `Hello` or a
    /// `Ready` queued before the pause is not lost). `Ok(None)` when it was
    /// deferred.
    pub fn go_or_defer(
        &mut self,
        to: InstanceState,
        reason: impl Into<String>,
    ) -> Result<Option<Transition>, IllegalTransition> {
        match self.resume_to {
            Some(before) if self.state == InstanceState::Paused => {
                if !before.can_go_to(to) {
                    return Err(IllegalTransition {
                        from: before,
                        to,
                        reason: reason.into(),
                    });
                }
                self.resume_to = Some(to);
                Ok(None)
            }
            _ => self.go(to, reason).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceState::*;
    use super::*;

    /// The full table, written out: every pair not listed must be refused.
    const ALLOWED: &[(InstanceState, InstanceState)] = &[
        (Pending, PreparingDisks),
        (Pending, Starting),
        (Pending, Booted),
        (Pending, Stopped),
        (Pending, Failed),
        (PreparingDisks, Starting),
        (PreparingDisks, Failed),
        (PreparingDisks, Stopped),
        (Starting, Booted),
        (Starting, Paused),
        (Starting, Unhealthy),
        (Starting, Restarting),
        (Starting, Stopping),
        (Booted, Ready),
        (Booted, Paused),
        (Booted, Unhealthy),
        (Booted, Restarting),
        (Booted, Stopping),
        (Ready, Booted),
        (Ready, Paused),
        (Ready, Unhealthy),
        (Ready, Restarting),
        (Ready, Stopping),
        (Paused, Starting),
        (Paused, Booted),
        (Paused, Ready),
        (Paused, Restarting),
        (Paused, Stopping),
        (Unhealthy, Restarting),
        (Unhealthy, Stopping),
        (Restarting, Starting),
        (Restarting, Failed),
        (Restarting, Stopping),
        (Stopping, Stopped),
        (Stopped, Pending),
        (Failed, Pending),
        (Failed, Stopped),
    ];

    #[test]
    fn transition_table_is_exactly_the_listed_pairs() {
        for from in InstanceState::ALL {
            for to in InstanceState::ALL {
                let want = ALLOWED.contains(&(from, to));
                assert_eq!(from.can_go_to(to), want, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn no_self_loops_and_every_state_reachable_and_left() {
        for s in InstanceState::ALL {
            assert!(!s.can_go_to(s), "{s} -> {s}");
            assert!(
                InstanceState::ALL.iter().any(|f| f.can_go_to(s)) || s == Pending,
                "{s} unreachable"
            );
            assert!(
                InstanceState::ALL.iter().any(|t| s.can_go_to(*t)),
                "{s} is a dead end"
            );
        }
    }

    #[test]
    fn illegal_transitions_leave_state_alone() {
        let mut l = Lifecycle::new();
        let e = l.go(Ready, "skip ahead").expect_err("illegal");
        assert_eq!((e.from, e.to), (Pending, Ready));
        assert_eq!(l.state(), Pending);
        assert_eq!(l.history().count(), 0);
        for (to, why) in [
            (PreparingDisks, "new"),
            (Starting, "disks ready"),
            (Booted, "hello"),
            (Ready, "ready"),
            (Unhealthy, "no heartbeat"),
            (Restarting, "restart"),
        ] {
            l.go(to, why).expect(why);
        }
        assert_eq!(l.state(), Restarting);
        let h: Vec<_> = l.history().map(|t| (t.from, t.to)).collect();
        assert_eq!(h.first(), Some(&(Pending, PreparingDisks)));
        assert_eq!(h.last(), Some(&(Unhealthy, Restarting)));
        assert!(l
            .history()
            .all(|t| t.at_unix_ms > 0 && !t.reason.is_empty()));
    }

    #[test]
    fn history_is_bounded() {
        let mut l = Lifecycle::new();
        l.go(PreparingDisks, "p").expect("ok");
        l.go(Starting, "s").expect("ok");
        for _ in 0..HISTORY_LEN {
            l.go(Restarting, "r").expect("ok");
            l.go(Starting, "s").expect("ok");
        }
        assert_eq!(l.history().count(), HISTORY_LEN);
    }

    #[test]
    fn paused_remembers_where_it_resumes_to() {
        let mut l = Lifecycle::new();
        for to in [PreparingDisks, Starting, Booted] {
            l.go(to, "up").expect("legal");
        }
        assert_eq!(l.resume_to(), None);
        l.go(Paused, "pause").expect("legal");
        assert!(l.is_paused());
        assert_eq!((l.resume_to(), l.effective()), (Some(Booted), Booted));
        // The guest's Ready while parked moves the state it resumes to.
        assert_eq!(l.go_or_defer(Ready, "ready").expect("legal"), None);
        assert_eq!((l.state(), l.effective()), (Paused, Ready));
        // Not a transition the resumed-to state allows: refused, nothing moves.
        l.go_or_defer(PreparingDisks, "bogus").expect_err("illegal");
        assert_eq!(l.effective(), Ready);
        let t = l.resume("resume").expect("legal");
        assert_eq!((t.from, t.to), (Paused, Ready));
        assert_eq!(l.resume_to(), None);
        l.resume("again").expect_err("not paused");
        // Leaving Paused another way forgets the resume state.
        l.go(Paused, "pause").expect("legal");
        l.go(Restarting, "the VMM exited").expect("legal");
        assert_eq!((l.resume_to(), l.effective()), (None, Restarting));
        // Outside Paused, go_or_defer is go.
        let t = l.go_or_defer(Starting, "restart").expect("legal");
        assert_eq!(t.map(|t| t.to), Some(Starting));
    }

    #[test]
    fn json_names() {
        let j = serde_json::to_string(&PreparingDisks).expect("json");
        assert_eq!(j, "\"preparing_disks\"");
        for s in InstanceState::ALL {
            assert_eq!(serde_json::to_string(&s).expect("json"), format!("\"{s}\""));
        }
    }
}
