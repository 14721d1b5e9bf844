//! One VMM's life inside an instance task: the guest's events, the VMM's
//! pushed events, operator commands, the health deadlines (boot and
//! heartbeats, stopped while paused), and a heartbeat interval changed live.

use tokio::time::Instant;
use vmm_api::control::Event as VmmEvent;

use super::task::{desired_changed, next_event, recv_opt, Runner, Sup};
use super::{Command, Desired, GuestInfo, InstanceOpError, InstanceState};
use crate::backend::guest::{boot_id_hex, GuestEvent, GuestLink, HostCommand, RoleStatus};
use crate::backend::vmm::VmmHandle;
use crate::events::AgentEvent;
use crate::util::{lock, now_unix_ms};

impl Runner {
    pub(super) async fn supervise(
        &mut self,
        handle: &mut Box<dyn VmmHandle>,
        link: &mut Option<GuestLink>,
    ) -> Sup {
        let policy = self.env.health.clone();
        let mut boot_deadline = Instant::now() + policy.boot_timeout;
        let mut last_life: Option<Instant> = None;
        let mut vmm_events = handle.take_events();
        loop {
            let interval = self
                .spec
                .heartbeat_interval_ms
                .max(self.interval_grace.unwrap_or(0));
            let hb_timeout = policy.heartbeat_timeout(interval);
            // No deadline while paused: a parked guest cannot send anything.
            let deadline = match self.paused_since {
                Some(_) => None,
                None => Some(last_life.map_or(boot_deadline, |t| t + hb_timeout)),
            };
            let was_paused = self.paused_since.is_some();
            tokio::select! {
                exit = handle.wait() => return Sup::Exited(Box::new(exit)),
                ev = next_event(link) => match ev {
                    Some(ev) => self.on_guest(ev, &mut last_life),
                    None => *link = None,
                },
                ev = recv_opt(&mut vmm_events) => match ev {
                    Some(ev) => self.on_vmm(ev, &mut last_life, &mut boot_deadline),
                    None => vmm_events = None,
                },
                Some(cmd) = self.commands.recv() => {
                    self.on_command(cmd, handle, &mut last_life, &mut boot_deadline).await;
                }
                _ = crate::util::sleep_until_opt(deadline) => {
                    return Sup::Unresponsive(match last_life {
                        None => format!("the guest agent did not say hello within {:?}", policy.boot_timeout),
                        Some(_) => format!("no heartbeat for {hb_timeout:?}"),
                    });
                }
                _ = desired_changed(&mut self.desired) => {
                    if self.desired_differs() {
                        if self.set_interval_live(link, &mut last_life) {
                            continue;
                        }
                        return Sup::Desired;
                    }
                }
            }
            // The guest channel's own clocks stop while the VM is parked.
            let paused = self.paused_since.is_some();
            if paused != was_paused {
                if let Some(l) = link {
                    let _ = l.commands.try_send(HostCommand::VmPaused(paused));
                }
            }
        }
    }

    /// A goal change of the heartbeat interval alone, for a guest that takes
    /// `SetHeartbeatInterval` (and is running, connected): applied live, the
    /// VMM keeps running. Returns whether it was.
    fn set_interval_live(
        &mut self,
        link: &Option<GuestLink>,
        last_life: &mut Option<Instant>,
    ) -> bool {
        let Desired::Run(new) = self.current_desired_peek() else {
            return false;
        };
        let mut same_but_interval = self.spec.clone();
        same_but_interval.heartbeat_interval_ms = new.heartbeat_interval_ms;
        let capable = self.guest_caps & guest_proto::Capabilities::HEARTBEAT_INTERVAL.bits() != 0;
        let connected = self.guest_connected;
        let (Some(l), true, true, true, None) = (
            link,
            same_but_interval == new,
            capable,
            connected,
            self.paused_since,
        ) else {
            return false;
        };
        let (old, ms) = (self.spec.heartbeat_interval_ms, new.heartbeat_interval_ms);
        if l.commands
            .try_send(HostCommand::SetHeartbeatInterval(ms))
            .is_err()
        {
            return false;
        }
        tracing::info!(instance = %self.id, old, new = ms, "heartbeat interval changed live");
        // Until the guest's next heartbeat, the longer of the two intervals
        // sets the deadline; the clock starts afresh.
        self.interval_grace = Some(old);
        if last_life.is_some() {
            *last_life = Some(Instant::now());
        }
        self.spec = new;
        self.update(|s| s.spec = self.spec.clone());
        self.persist();
        true
    }

    /// The state, or while paused the one it resumes to.
    fn effective_state(&self) -> InstanceState {
        lock(&self.shared).lifecycle.effective()
    }

    /// Enters `Paused` (once); the lifecycle remembers where to go back to.
    fn enter_paused(&mut self, reason: &str) {
        if self.paused_since.is_some() || !self.state().can_go_to(InstanceState::Paused) {
            return;
        }
        self.paused_since = Some(Instant::now());
        self.go(InstanceState::Paused, reason);
    }

    /// Leaves `Paused` for the state before it; the health clocks restart, so
    /// the time spent paused does not count against the guest.
    fn leave_paused(
        &mut self,
        reason: &str,
        last_life: &mut Option<Instant>,
        boot_deadline: &mut Instant,
    ) {
        let Some(since) = self.paused_since.take() else {
            return;
        };
        let now = Instant::now();
        *boot_deadline += now.duration_since(since);
        if last_life.is_some() {
            *last_life = Some(now);
        }
        self.go_resume(reason);
    }

    /// An event the VMM pushed on its control socket.
    fn on_vmm(
        &mut self,
        ev: VmmEvent,
        last_life: &mut Option<Instant>,
        boot_deadline: &mut Instant,
    ) {
        match ev {
            VmmEvent::BootTimer { us } => {
                tracing::info!(instance = %self.id, boot_time_us = us, "the guest wrote the boot timer");
                self.update(|s| s.boot_time_us = Some(us));
                let _ = self.env.events.send(AgentEvent::GuestBooted {
                    instance: self.id.clone(),
                    boot_time_us: us,
                });
                if self.effective_state() == InstanceState::Starting {
                    self.go_or_defer(
                        InstanceState::Booted,
                        format!(
                            "the guest booted: boot timer {:.1} ms after the VMM started",
                            us as f64 / 1000.0
                        ),
                    );
                }
            }
            VmmEvent::Paused => {
                self.enter_paused("the VMM reports its vCPUs paused");
            }
            VmmEvent::Resumed => {
                self.leave_paused(
                    "the VMM reports its vCPUs running again",
                    last_life,
                    boot_deadline,
                );
            }
            VmmEvent::Stopping {
                reason,
                exit_code,
                detail,
            } => {
                tracing::info!(instance = %self.id, ?reason, exit_code, %detail, "the VMM is stopping");
            }
        }
    }

    /// Pause or resume, asked through the agent.
    async fn on_command(
        &mut self,
        cmd: Command,
        handle: &mut Box<dyn VmmHandle>,
        last_life: &mut Option<Instant>,
        boot_deadline: &mut Instant,
    ) {
        let (pause, reply) = match cmd {
            Command::Pause(r) => (true, r),
            Command::Resume(r) => (false, r),
            Command::Inspect(reply) => {
                if !reply.is_closed() {
                    let view = handle
                        .inspect()
                        .await
                        .map_err(|source| InstanceOpError::Vmm {
                            id: self.id.clone(),
                            source,
                        });
                    let _ = reply.send(view);
                }
                return;
            }
        };
        if reply.is_closed() {
            // The caller gave up waiting (the request came between VMMs).
            return;
        }
        let state = self.state();
        let wrong = |what| InstanceOpError::WrongState {
            id: self.id.clone(),
            state,
            what,
        };
        let result = if pause {
            if self.paused_since.is_some() {
                Err(wrong("it is paused already"))
            } else if !state.can_go_to(InstanceState::Paused) {
                Err(wrong(
                    "only a starting, booted or ready instance can be paused",
                ))
            } else {
                match handle.pause().await {
                    Ok(()) => {
                        self.enter_paused("paused through the agent");
                        Ok(())
                    }
                    Err(source) => Err(InstanceOpError::Vmm {
                        id: self.id.clone(),
                        source,
                    }),
                }
            }
        } else if self.paused_since.is_none() {
            Err(wrong("only a paused instance can be resumed"))
        } else {
            match handle.resume().await {
                Ok(()) => {
                    self.leave_paused("resumed through the agent", last_life, boot_deadline);
                    Ok(())
                }
                Err(source) => Err(InstanceOpError::Vmm {
                    id: self.id.clone(),
                    source,
                }),
            }
        };
        let _ = reply.send(result);
    }

    fn on_guest(&mut self, ev: GuestEvent, last_life: &mut Option<Instant>) {
        let now = Instant::now();
        // While paused, what the guest says moves the state it resumes to.
        let state = self.effective_state();
        match ev {
            GuestEvent::Hello {
                boot_id,
                version,
                capabilities,
                agent_version,
            } => {
                *last_life = Some(now);
                self.guest_connected = true;
                let rebooted = self.boot_id.is_some_and(|b| b != boot_id);
                if rebooted {
                    self.misbehaved(format!(
                        "a Hello with a new boot id ({}) while the same VMM runs: another connection claims to be the guest",
                        boot_id_hex(&boot_id)
                    ));
                }
                self.boot_id = Some(boot_id);
                self.guest_caps = capabilities;
                let info = GuestInfo {
                    boot_id: boot_id_hex(&boot_id),
                    protocol_version: version,
                    capabilities,
                    agent_version: agent_version.clone(),
                };
                let _ = self.env.events.send(AgentEvent::GuestHello {
                    instance: self.id.clone(),
                    boot_id: info.boot_id.clone(),
                    agent_version: agent_version.clone(),
                });
                self.update(|s| {
                    s.guest = Some(info);
                    s.last_heartbeat_unix_ms = Some(now_unix_ms());
                });
                match state {
                    InstanceState::Starting => self.go_or_defer(
                        InstanceState::Booted,
                        format!("the guest agent said hello ({agent_version}, protocol {version})"),
                    ),
                    InstanceState::Ready if rebooted => {
                        self.go_or_defer(InstanceState::Booted, "the guest rebooted (new boot id)")
                    }
                    _ => {}
                }
            }
            GuestEvent::Heartbeat {
                seq,
                role,
                role_restarts: _,
                ..
            } => {
                *last_life = Some(now);
                self.interval_grace = None;
                self.update(|s| {
                    s.last_heartbeat_unix_ms = Some(now_unix_ms());
                    s.heartbeat_seq = Some(seq);
                    s.role = Some(role);
                });
                match (state, role) {
                    (InstanceState::Booted, RoleStatus::Ready) => {
                        self.go_or_defer(InstanceState::Ready, "a heartbeat says the role is ready")
                    }
                    (InstanceState::Ready, RoleStatus::Exited | RoleStatus::Failed) => self
                        .go_or_defer(
                            InstanceState::Booted,
                            format!("a heartbeat says the role is {role:?}"),
                        ),
                    _ => {}
                }
            }
            GuestEvent::Ready => {
                *last_life = Some(now);
                if state == InstanceState::Booted {
                    self.go_or_defer(InstanceState::Ready, "the guest reported ready");
                }
            }
            GuestEvent::RoleStarted { pid } => {
                *last_life = Some(now);
                tracing::info!(instance = %self.id, pid, "role started");
            }
            GuestEvent::RoleExited { pid, how } => {
                *last_life = Some(now);
                tracing::info!(instance = %self.id, pid, %how, "role exited");
                let _ = self.env.events.send(AgentEvent::RoleExited {
                    instance: self.id.clone(),
                    how: how.clone(),
                });
                if state == InstanceState::Ready {
                    self.go_or_defer(InstanceState::Booted, format!("the role exited ({how})"));
                }
            }
            GuestEvent::Pong { .. } => *last_life = Some(now),
            GuestEvent::Disconnected {
                reason,
                misbehaving,
            } => {
                self.guest_connected = false;
                if misbehaving {
                    self.misbehaved(reason);
                }
            }
        }
    }

    /// Counts and announces a misbehaviour of the guest side.
    fn misbehaved(&self, reason: String) {
        tracing::warn!(instance = %self.id, %reason, "the guest misbehaved");
        self.update(|s| s.guest_misbehaviours = s.guest_misbehaviours.saturating_add(1));
        let _ = self.env.events.send(AgentEvent::GuestMisbehaved {
            instance: self.id.clone(),
            reason,
        });
    }
}
