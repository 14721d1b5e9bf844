//! Fakes of the three seams, for tests of the agent (and of controllers that
//! embed it) without KVM, disks or guests. They run on tokio's clock, so tests
//! can use `tokio::time::pause` to make timeouts and backoff instant.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use vmm_api::control::Event;
use vmm_api::{DiskConfig, DiskFormat, ExitReason, ExitReport};

use super::disks::{DiskPrepError, DiskPreparer, DiskRequest, PreparedDisks};
use super::guest::{
    GuestChannel, GuestEndpoint, GuestError, GuestEvent, GuestLink, HostCommand, RoleStatus,
};
use super::vmm::{
    LaunchSpec, StopMode, VmmError, VmmEvents, VmmExit, VmmHandle, VmmLauncher, VmmRecord, VmmView,
};
use crate::util::lock;

#[derive(Debug)]
struct FakeVm {
    instance: String,
    start_time: u64,
    exit: watch::Sender<Option<VmmExit>>,
    paused: bool,
    /// Every handle's event stream.
    events: Vec<mpsc::Sender<Event>>,
}

impl FakeVm {
    fn push(&mut self, e: Event) {
        self.events.retain(|tx| tx.try_send(e.clone()).is_ok());
    }

    /// A new handle's event stream, with the state replayed as the real
    /// control socket does on subscribing.
    fn subscribe(&mut self) -> VmmEvents {
        let (tx, rx) = mpsc::channel(16);
        if self.paused {
            let _ = tx.try_send(Event::Paused);
        }
        self.events.push(tx);
        rx
    }
}

#[derive(Debug, Default)]
struct LauncherState {
    next_pid: i32,
    vms: BTreeMap<i32, FakeVm>,
    launches: Vec<String>,
    /// Each launch's virtio-net devices, by instance (the last launch's).
    nets: BTreeMap<String, Vec<vmm_api::NetConfig>>,
    last_spec: BTreeMap<String, LaunchSpec>,
    fail_launches: u32,
    ignore_graceful: bool,
    launch_delay: Duration,
}

/// A fake [`VmmLauncher`]: "VMMs" are entries in a table that survive the
/// agent (share one launcher between two agents to test re-adoption).
#[derive(Debug, Clone, Default)]
pub struct FakeLauncher {
    st: Arc<Mutex<LauncherState>>,
}

fn report(reason: ExitReason, detail: &str) -> VmmExit {
    VmmExit {
        report: Some(ExitReport {
            reason,
            exit_code: reason.exit_code(),
            detail: detail.into(),
            boot_time_us: None,
            first_run_us: None,
            total_us: 0,
            vcpu: None,
            regs: None,
        }),
        status: Some(reason.exit_code()),
        signal: None,
        detail: detail.into(),
    }
}

impl FakeLauncher {
    /// A launcher with no VMs.
    pub fn new() -> Self {
        Self::default()
    }

    /// The virtio-net devices `instance`'s last launch was given.
    pub fn nets(&self, instance: &str) -> Vec<vmm_api::NetConfig> {
        lock(&self.st)
            .nets
            .get(instance)
            .cloned()
            .unwrap_or_default()
    }

    /// How many times a VMM was launched for `instance`.
    pub fn launches(&self, instance: &str) -> usize {
        lock(&self.st)
            .launches
            .iter()
            .filter(|i| *i == instance)
            .count()
    }

    /// The spec of `instance`'s last launch.
    pub fn last_spec(&self, instance: &str) -> Option<LaunchSpec> {
        lock(&self.st).last_spec.get(instance).cloned()
    }

    /// The pid of `instance`'s running VMM.
    pub fn running(&self, instance: &str) -> Option<i32> {
        lock(&self.st)
            .vms
            .iter()
            .find(|(_, v)| v.instance == instance)
            .map(|(p, _)| *p)
    }

    /// Number of running VMMs.
    pub fn running_count(&self) -> usize {
        lock(&self.st).vms.len()
    }

    /// Ends `instance`'s VMM as if the guest did `reason`. Returns whether one ran.
    pub fn exit(&self, instance: &str, reason: ExitReason) -> bool {
        let mut st = lock(&self.st);
        let pid = st
            .vms
            .iter()
            .find(|(_, v)| v.instance == instance)
            .map(|(p, _)| *p);
        match pid.and_then(|p| st.vms.remove(&p)) {
            Some(vm) => {
                vm.exit
                    .send_replace(Some(report(reason, &format!("fake {reason:?}"))));
                true
            }
            None => false,
        }
    }

    /// Whether `instance`'s VMM is paused.
    pub fn is_paused(&self, instance: &str) -> bool {
        lock(&self.st)
            .vms
            .values()
            .any(|v| v.instance == instance && v.paused)
    }

    /// Pauses or resumes `instance`'s VMM from outside the agent (as an
    /// operator with the VMM's control socket would): the VMM pushes the
    /// event. Returns whether the state changed.
    pub fn set_paused(&self, instance: &str, paused: bool) -> bool {
        let mut st = lock(&self.st);
        let Some(vm) = st.vms.values_mut().find(|v| v.instance == instance) else {
            return false;
        };
        if vm.paused == paused {
            return false;
        }
        vm.paused = paused;
        vm.push(if paused {
            Event::Paused
        } else {
            Event::Resumed
        });
        true
    }

    /// Makes `instance`'s VMM push a boot-timer event.
    pub fn boot_timer(&self, instance: &str, us: u64) -> bool {
        let mut st = lock(&self.st);
        match st.vms.values_mut().find(|v| v.instance == instance) {
            Some(vm) => {
                vm.push(Event::BootTimer { us });
                true
            }
            None => false,
        }
    }

    /// Makes `launch` take this long after the VM exists (tokio's clock): the
    /// window in which an agent has spawned a VMM but not recorded it.
    pub fn set_launch_delay(&self, d: Duration) {
        lock(&self.st).launch_delay = d;
    }

    /// Makes the next `n` launches fail.
    pub fn fail_launches(&self, n: u32) {
        lock(&self.st).fail_launches = n;
    }

    /// Makes VMMs ignore graceful stops (to test the forced path).
    pub fn ignore_graceful(&self, yes: bool) {
        lock(&self.st).ignore_graceful = yes;
    }

    fn launch_now(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmHandle>, VmmError> {
        let mut st = lock(&self.st);
        st.launches.push(spec.instance_id.clone());
        st.nets
            .insert(spec.instance_id.clone(), spec.net.iter().cloned().collect());
        st.last_spec.insert(spec.instance_id.clone(), spec.clone());
        if st.fail_launches > 0 {
            st.fail_launches -= 1;
            return Err(VmmError::Spawn {
                instance: spec.instance_id.clone(),
                why: "fake launch failure".into(),
            });
        }
        st.next_pid += 1;
        let pid = 1000 + st.next_pid;
        let start_time = 7000 + u64::from(st.next_pid.unsigned_abs());
        let (tx, rx) = watch::channel(None);
        let (ev_tx, ev_rx) = mpsc::channel(16);
        st.vms.insert(
            pid,
            FakeVm {
                instance: spec.instance_id.clone(),
                start_time,
                exit: tx,
                paused: false,
                events: vec![ev_tx],
            },
        );
        Ok(Box::new(FakeHandle {
            pid,
            start_time,
            rx,
            launcher: self.clone(),
            dir: spec.dir.clone(),
            events: Some(ev_rx),
        }))
    }

    fn end(&self, pid: i32, exit: VmmExit) {
        if let Some(vm) = lock(&self.st).vms.remove(&pid) {
            vm.exit.send_replace(Some(exit));
        }
    }
}

#[async_trait]
impl VmmLauncher for FakeLauncher {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmHandle>, VmmError> {
        let handle = self.launch_now(spec)?;
        let delay = lock(&self.st).launch_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(handle)
    }

    async fn recover(&self, spec: &LaunchSpec) -> Option<VmmRecord> {
        let st = lock(&self.st);
        st.vms
            .iter()
            .find(|(_, v)| v.instance == spec.instance_id)
            .map(|(pid, v)| VmmRecord {
                pid: *pid,
                start_time: v.start_time,
                control_socket: None,
                exit_report: spec.dir.join("exit-report.json"),
                jail: None,
            })
    }

    async fn adopt(
        &self,
        spec: &LaunchSpec,
        record: &VmmRecord,
    ) -> Result<Box<dyn VmmHandle>, VmmError> {
        let mut st = lock(&self.st);
        match st.vms.get_mut(&record.pid) {
            Some(vm) if vm.start_time == record.start_time && vm.instance == spec.instance_id => {
                Ok(Box::new(FakeHandle {
                    pid: record.pid,
                    start_time: vm.start_time,
                    rx: vm.exit.subscribe(),
                    launcher: self.clone(),
                    dir: spec.dir.clone(),
                    events: Some(vm.subscribe()),
                }))
            }
            Some(_) => Err(VmmError::Gone {
                pid: record.pid,
                why: "the pid now belongs to another process".into(),
            }),
            None => Err(VmmError::Gone {
                pid: record.pid,
                why: "no such process".into(),
            }),
        }
    }
}

/// A fake VMM.
#[derive(Debug)]
pub struct FakeHandle {
    pid: i32,
    start_time: u64,
    rx: watch::Receiver<Option<VmmExit>>,
    launcher: FakeLauncher,
    dir: std::path::PathBuf,
    events: Option<VmmEvents>,
}

impl FakeHandle {
    fn set_running(&self, run: bool) -> Result<(), VmmError> {
        let mut st = lock(&self.launcher.st);
        let Some(vm) = st.vms.get_mut(&self.pid) else {
            return Err(VmmError::Control {
                pid: self.pid,
                source: super::control::ControlError::Closed,
            });
        };
        if vm.paused != run {
            return Err(VmmError::Control {
                pid: self.pid,
                source: super::control::ControlError::Refused(vmm_api::control::ApiError::new(
                    vmm_api::control::ErrorKind::InvalidState,
                    if run {
                        "the VM is running"
                    } else {
                        "the VM is paused"
                    },
                )),
            });
        }
        vm.paused = !run;
        vm.push(if run { Event::Resumed } else { Event::Paused });
        Ok(())
    }
}

#[async_trait]
impl VmmHandle for FakeHandle {
    fn record(&self) -> VmmRecord {
        VmmRecord {
            pid: self.pid,
            start_time: self.start_time,
            control_socket: None,
            exit_report: self.dir.join("exit-report.json"),
            jail: None,
        }
    }

    async fn stop(&mut self, mode: StopMode) -> Result<(), VmmError> {
        match mode {
            StopMode::Graceful => {
                if !lock(&self.launcher.st).ignore_graceful {
                    self.launcher.end(
                        self.pid,
                        VmmExit {
                            report: None,
                            status: None,
                            signal: Some(15),
                            detail: "killed by signal 15".into(),
                        },
                    );
                }
            }
            StopMode::Force => self.launcher.end(
                self.pid,
                VmmExit {
                    report: None,
                    status: None,
                    signal: Some(9),
                    detail: "killed by signal 9".into(),
                },
            ),
        }
        Ok(())
    }

    async fn wait(&mut self) -> VmmExit {
        loop {
            if let Some(e) = self.rx.borrow_and_update().clone() {
                return e;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    async fn pause(&mut self) -> Result<(), VmmError> {
        self.set_running(false)
    }

    async fn resume(&mut self) -> Result<(), VmmError> {
        self.set_running(true)
    }

    async fn inspect(&mut self) -> Result<VmmView, VmmError> {
        Err(VmmError::Control {
            pid: self.pid,
            source: super::control::ControlError::Unreachable {
                path: std::path::PathBuf::new(),
                why: "a fake VMM has no control socket".into(),
            },
        })
    }

    fn take_events(&mut self) -> Option<VmmEvents> {
        self.events.take()
    }
}

#[derive(Debug, Default)]
struct DiskState {
    fail: BTreeMap<String, String>,
    prepared: Vec<String>,
    made: Vec<(String, super::disks::DiskSet)>,
    delay: Duration,
}

/// A fake [`DiskPreparer`]: writes three small files, or fails on request.
/// The OS disk's file names its base, the role disk's holds the instance file
/// ([`super::disks::InstanceFile`], bytes from [`super::disks::instance_file_bytes`]) the real role disk carries.
#[derive(Debug, Clone, Default)]
pub struct FakeDisks {
    st: Arc<Mutex<DiskState>>,
}

impl FakeDisks {
    /// A preparer that succeeds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes preparation for `instance` fail with `why` (after writing a
    /// partial file, as a real failure might).
    pub fn fail_for(&self, instance: &str, why: &str) {
        lock(&self.st).fail.insert(instance.into(), why.into());
    }

    /// Lets `instance` succeed again.
    pub fn heal(&self, instance: &str) {
        lock(&self.st).fail.remove(instance);
    }

    /// Makes preparation take this long (tokio's clock).
    pub fn set_delay(&self, d: Duration) {
        lock(&self.st).delay = d;
    }

    /// How many times all disks were made for `instance` (full preparations,
    /// not an update's remakes).
    pub fn prepared(&self, instance: &str) -> usize {
        lock(&self.st)
            .prepared
            .iter()
            .filter(|i| *i == instance)
            .count()
    }

    /// Which disks each successful preparation ([`super::disks::DiskSet::ALL`]) or remake
    /// made for `instance`, oldest first.
    pub fn made(&self, instance: &str) -> Vec<super::disks::DiskSet> {
        lock(&self.st)
            .made
            .iter()
            .filter(|(i, _)| i == instance)
            .map(|(_, s)| *s)
            .collect()
    }

    /// Writes the disks in `which` (the first one only, then fails, if
    /// `fail_for` says so); the others of `current` stay as they are.
    async fn make(
        &self,
        req: &DiskRequest,
        current: Option<&PreparedDisks>,
        which: super::disks::DiskSet,
    ) -> Result<PreparedDisks, DiskPrepError> {
        let delay = lock(&self.st).delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let io = |e: std::io::Error| DiskPrepError::Other(e.to_string());
        let d = |name: &str, ro| DiskConfig {
            path: req.dir.join(name),
            format: DiskFormat::Raw,
            backing: None,
            read_only: ro,
            serial: name.replace('.', "-"),
            rate_limit: None,
        };
        let fresh = PreparedDisks {
            os: d("os.qcow2", false),
            resource: d("resource.raw", false),
            role: d("role.raw", true),
        };
        let mut out = current.cloned().unwrap_or_else(|| fresh.clone());
        let os = format!("fake os over {}", req.base.display()).into_bytes();
        let role = super::disks::instance_file_bytes(req)?;
        let mut first = true;
        for (on, cfg, slot, bytes) in [
            (which.os, &fresh.os, &mut out.os, os),
            (
                which.resource,
                &fresh.resource,
                &mut out.resource,
                b"fake resource".to_vec(),
            ),
            (which.role, &fresh.role, &mut out.role, role),
        ] {
            if !on {
                continue;
            }
            // A new file (a new inode), as the real preparer makes.
            let _ = std::fs::remove_file(&slot.path);
            std::fs::write(&cfg.path, bytes).map_err(io)?;
            *slot = cfg.clone();
            if first {
                first = false;
                if let Some(why) = lock(&self.st).fail.get(&req.instance_id) {
                    return Err(DiskPrepError::Other(why.clone()));
                }
            }
        }
        lock(&self.st).made.push((req.instance_id.clone(), which));
        Ok(out)
    }
}

#[async_trait]
impl DiskPreparer for FakeDisks {
    async fn prepare(&self, req: &DiskRequest) -> Result<PreparedDisks, DiskPrepError> {
        let d = self.make(req, None, super::disks::DiskSet::ALL).await?;
        lock(&self.st).prepared.push(req.instance_id.clone());
        Ok(d)
    }

    async fn remake(
        &self,
        req: &DiskRequest,
        current: &PreparedDisks,
        which: super::disks::DiskSet,
    ) -> Result<PreparedDisks, DiskPrepError> {
        super::disks::check_kept(current, which)?;
        self.make(req, Some(current), which).await
    }
}

/// How a fake guest behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestBehaviour {
    /// Hello, Ready, heartbeats with the role ready.
    Healthy,
    /// Hello and heartbeats, the role never ready.
    NotReady,
    /// Hello, then nothing.
    HelloOnly,
    /// Nothing at all.
    Silent,
}

#[derive(Debug)]
struct GuestsState {
    default: GuestBehaviour,
    per: BTreeMap<String, GuestBehaviour>,
    opens: BTreeMap<String, usize>,
    commands: Vec<(String, HostCommand)>,
    launcher: Option<FakeLauncher>,
    impostors: std::collections::BTreeSet<String>,
}

/// A fake [`GuestChannel`]: a scripted guest per instance, heartbeating on
/// tokio's clock. Change a guest's behaviour at any time with
/// [`FakeGuests::set`].
#[derive(Debug, Clone)]
pub struct FakeGuests {
    st: Arc<Mutex<GuestsState>>,
}

impl Default for FakeGuests {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeGuests {
    /// Healthy guests.
    pub fn new() -> Self {
        Self {
            st: Arc::new(Mutex::new(GuestsState {
                default: GuestBehaviour::Healthy,
                per: BTreeMap::new(),
                opens: BTreeMap::new(),
                commands: Vec::new(),
                launcher: None,
                impostors: Default::default(),
            })),
        }
    }

    /// Guests that obey `Shutdown` by powering their fake VM off, send
    /// nothing while it is paused, and take `SetHeartbeatInterval`.
    pub fn with_launcher(launcher: FakeLauncher) -> Self {
        let g = Self::new();
        lock(&g.st).launcher = Some(launcher);
        g
    }

    /// Sets the behaviour of every guest without its own.
    pub fn set_default(&self, b: GuestBehaviour) {
        lock(&self.st).default = b;
    }

    /// Sets one instance's guest behaviour (takes effect at its next beat).
    pub fn set(&self, instance: &str, b: GuestBehaviour) {
        lock(&self.st).per.insert(instance.into(), b);
    }

    /// At `instance`'s next beat, a `Hello` with another boot id arrives on
    /// its link, as when a second connection stands in for the guest.
    pub fn impostor_hello(&self, instance: &str) {
        lock(&self.st).impostors.insert(instance.into());
    }

    /// Commands the agent sent to `instance`'s guest.
    pub fn commands(&self, instance: &str) -> Vec<HostCommand> {
        lock(&self.st)
            .commands
            .iter()
            .filter(|(i, _)| i == instance)
            .map(|(_, c)| *c)
            .collect()
    }

    fn behaviour(&self, instance: &str) -> GuestBehaviour {
        let st = lock(&self.st);
        st.per.get(instance).copied().unwrap_or(st.default)
    }
}

#[async_trait]
impl GuestChannel for FakeGuests {
    async fn open(&self, instance_id: &str, ep: &GuestEndpoint) -> Result<GuestLink, GuestError> {
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let (cmd_tx, mut cmd_rx) = mpsc::channel(16);
        let boot = {
            let mut st = lock(&self.st);
            let n = st.opens.entry(instance_id.into()).or_insert(0);
            *n += 1;
            *n
        };
        let me = self.clone();
        let id = instance_id.to_string();
        let interval = Duration::from_millis(u64::from(ep.heartbeat_interval_ms));
        let task = tokio::spawn(async move {
            let b = me.behaviour(&id);
            if b == GuestBehaviour::Silent {
                while let Some(c) = cmd_rx.recv().await {
                    if !matches!(c, HostCommand::VmPaused(_)) {
                        lock(&me.st).commands.push((id.clone(), c));
                    }
                }
                return;
            }
            let has_launcher = lock(&me.st).launcher.is_some();
            let caps = guest_proto::Capabilities::ROLE.bits()
                | if has_launcher {
                    guest_proto::Capabilities::SHUTDOWN.bits()
                        | guest_proto::Capabilities::HEARTBEAT_INTERVAL.bits()
                } else {
                    0
                };
            let mut boot_id = [0u8; 16];
            boot_id[..8].copy_from_slice(&(boot as u64).to_le_bytes());
            let hello = GuestEvent::Hello {
                boot_id,
                version: 1,
                capabilities: caps,
                agent_version: "fake-guest 0".into(),
            };
            if ev_tx.send(hello).await.is_err() {
                return;
            }
            if b == GuestBehaviour::Healthy && ev_tx.send(GuestEvent::Ready).await.is_err() {
                return;
            }
            let mut seq = 0u64;
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let paused = lock(&me.st).launcher.as_ref().is_some_and(|l| l.is_paused(&id));
                        if paused {
                            continue;
                        }
                        if lock(&me.st).impostors.remove(&id) {
                            let hello = GuestEvent::Hello {
                                boot_id: [0xee; 16],
                                version: 1,
                                capabilities: caps,
                                agent_version: "impostor 0".into(),
                            };
                            if ev_tx.send(hello).await.is_err() { return; }
                        }
                        let role = match me.behaviour(&id) {
                            GuestBehaviour::Healthy => RoleStatus::Ready,
                            GuestBehaviour::NotReady => RoleStatus::Running,
                            GuestBehaviour::HelloOnly | GuestBehaviour::Silent => continue,
                        };
                        let hb = GuestEvent::Heartbeat { seq, uptime_ms: seq * interval.as_millis() as u64, free_mem_kib: 1 << 20, role, role_restarts: 0 };
                        seq += 1;
                        if ev_tx.send(hb).await.is_err() { return; }
                    }
                    c = cmd_rx.recv() => match c {
                        None => return,
                        // Channel-side only: nothing reaches the guest.
                        Some(HostCommand::VmPaused(_)) => {}
                        Some(c) => {
                            let launcher = {
                                let mut st = lock(&me.st);
                                st.commands.push((id.clone(), c));
                                st.launcher.clone()
                            };
                            if let HostCommand::SetHeartbeatInterval(ms) = c {
                                let every = Duration::from_millis(u64::from(ms.max(1)));
                                tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                            }
                            if let (HostCommand::Shutdown { .. }, Some(l)) = (c, launcher) {
                                // A paused guest cannot act on it.
                                if !l.is_paused(&id) {
                                    l.exit(&id, ExitReason::PowerOff);
                                }
                            }
                        }
                    },
                }
            }
        });
        Ok(GuestLink::new(ev_rx, cmd_tx, Some(task), None))
    }
}

#[derive(Debug, Default)]
struct NetState {
    taps: BTreeMap<String, super::net::TapSpec>,
    rules: Option<super::net::NetRules>,
    applied: usize,
    fail_taps: bool,
}

/// A fake [`super::net::NetworkBackend`]: TAPs are entries in a table, the
/// rules are kept as last applied.
#[derive(Debug, Clone, Default)]
pub struct FakeNet {
    st: Arc<Mutex<NetState>>,
}

impl FakeNet {
    /// A network with no TAP.
    pub fn new() -> Self {
        Self::default()
    }

    /// The TAPs that exist, by name.
    pub fn taps(&self) -> BTreeMap<String, super::net::TapSpec> {
        lock(&self.st).taps.clone()
    }

    /// The rules last applied.
    pub fn rules(&self) -> Option<super::net::NetRules> {
        lock(&self.st).rules.clone()
    }

    /// How many times rules were applied.
    pub fn applied(&self) -> usize {
        lock(&self.st).applied
    }

    /// Makes every TAP creation fail (or work again).
    pub fn fail_taps(&self, yes: bool) {
        lock(&self.st).fail_taps = yes;
    }
}

#[async_trait]
impl super::net::NetworkBackend for FakeNet {
    async fn ensure_tap(&self, tap: &super::net::TapSpec) -> Result<(), super::net::NetError> {
        let mut st = lock(&self.st);
        if st.fail_taps {
            return Err(super::net::NetError::Tap {
                name: tap.name.clone(),
                why: "fake TAP failure".into(),
            });
        }
        st.taps.insert(tap.name.clone(), tap.clone());
        Ok(())
    }

    async fn remove_tap(&self, name: &str) -> Result<(), super::net::NetError> {
        lock(&self.st).taps.remove(name);
        Ok(())
    }

    async fn apply_rules(&self, rules: &super::net::NetRules) -> Result<(), super::net::NetError> {
        let mut st = lock(&self.st);
        st.rules = Some(rules.clone());
        st.applied += 1;
        Ok(())
    }
}
