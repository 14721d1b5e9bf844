//! Shared set-up for the agent's tests: an agent on fakes in a temporary
//! state directory, with one cached base image and one role package.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use agent::backend::fake::{FakeDisks, FakeGuests, FakeLauncher};
use agent::{
    Agent, AgentConfig, Backends, Capacity, GoalState, InstanceSpec, InstanceState, NodeConfig,
};

pub struct H {
    pub agent: Agent,
    pub launcher: FakeLauncher,
    pub disks: FakeDisks,
    pub guests: FakeGuests,
    pub dir: tempfile::TempDir,
    pub image: String,
    pub role: std::path::PathBuf,
}

pub fn config(dir: &std::path::Path) -> AgentConfig {
    let node = NodeConfig::new(
        "node-1",
        Capacity {
            vcpus: 8,
            memory_mib: 4096,
            disk_mib: 10_000,
        },
    );
    let mut cfg = AgentConfig::new(dir.join("state"), node);
    cfg.health.boot_timeout = Duration::from_secs(30);
    cfg.health.stop_grace = Duration::from_secs(4);
    cfg
}

pub fn backends(l: &FakeLauncher, d: &FakeDisks, g: &FakeGuests) -> Backends {
    Backends {
        launcher: Arc::new(l.clone()),
        disks: Arc::new(d.clone()),
        guests: Arc::new(g.clone()),
    }
}

pub async fn harness() -> H {
    harness_with(|_| {}).await
}

pub async fn harness_with(f: impl FnOnce(&mut AgentConfig)) -> H {
    let dir = tempfile::Builder::new()
        .prefix("rdg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mut cfg = config(dir.path());
    f(&mut cfg);
    let launcher = FakeLauncher::new();
    let disks = FakeDisks::new();
    let guests = FakeGuests::new();
    let agent = Agent::open(cfg, backends(&launcher, &disks, &guests))
        .await
        .expect("open agent");
    let img = dir.path().join("base.raw");
    std::fs::write(&img, b"base image bytes").expect("write image");
    let info = agent
        .image_cache()
        .import_file(&img, vmm_api::DiskFormat::Raw, None)
        .expect("import");
    let role = dir.path().join("role");
    std::fs::create_dir(&role).expect("role dir");
    std::fs::write(role.join("run.sh"), "#!/bin/sh\n").expect("role file");
    H {
        agent,
        launcher,
        disks,
        guests,
        image: info.reference(),
        role,
        dir,
    }
}

impl H {
    pub fn spec(&self, id: &str) -> InstanceSpec {
        InstanceSpec {
            id: id.into(),
            role: "web".into(),
            base_image: self.image.clone(),
            role_package: self.role.clone(),
            vcpus: 1,
            memory_mib: 256,
            resource_disk_mib: 100,
            env: [("MODE".to_string(), "test".to_string())].into(),
            heartbeat_interval_ms: 1000,
            disk_rate_limit: None,
        }
    }

    pub fn goal(&self, incarnation: u64, ids: &[&str]) -> GoalState {
        GoalState {
            incarnation,
            instances: ids.iter().map(|i| self.spec(i)).collect(),
        }
    }

    pub async fn wait_state(&self, id: &str, state: InstanceState) -> agent::InstanceStatus {
        match self
            .agent
            .wait_for(id, Duration::from_secs(600), |s| {
                s.is_some_and(|s| s.state == state)
            })
            .await
        {
            Some(s) => s,
            None => panic!("{id} never reached {state}: {:#?}", self.agent.instance(id)),
        }
    }

    pub async fn wait_gone(&self, id: &str) {
        assert!(
            self.agent
                .wait_for(id, Duration::from_secs(600), |s| s.is_none())
                .await
                .is_none(),
            "{id} was not removed"
        );
    }

    pub fn states(&self, id: &str) -> Vec<(InstanceState, InstanceState)> {
        self.agent
            .instance(id)
            .map(|s| s.history.iter().map(|t| (t.from, t.to)).collect())
            .unwrap_or_default()
    }
}

/// Waits for `id`'s transition into `to` on an event stream (catches
/// transient states such as Unhealthy, which the instance leaves at once).
pub async fn wait_transition(
    ev: &mut tokio::sync::broadcast::Receiver<agent::AgentEvent>,
    id: &str,
    to: InstanceState,
) -> agent::Transition {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Ok(agent::AgentEvent::Transition {
                instance,
                transition,
            })) if instance == id && transition.to == to => return transition,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("event stream: {e}"),
            Err(_) => panic!("{id} never went to {to}"),
        }
    }
}

/// A `reddog-agent` child process, killed when dropped.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (at most 20 s) for the agent to create its API socket.
pub fn wait_for_socket(sock: &std::path::Path) {
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the agent did not create its socket {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
