//! The agent library on its fake backends (`agent::backend::fake`) in a
//! temporary state directory, with one cached base image and one role
//! package: the set-up of the fake-backed scenario and API tests.

use std::sync::Arc;
use std::time::Duration;

use agent::backend::fake::{FakeDisks, FakeGuests, FakeLauncher};
use agent::{
    Agent, AgentConfig, Backends, Capacity, GoalState, InstanceSpec, InstanceState, NodeConfig,
};

/// An agent on fakes, the fakes themselves (to script them) and its files.
pub struct FakeAgent {
    /// The agent.
    pub agent: Agent,
    /// Its launcher.
    pub launcher: FakeLauncher,
    /// Its disk preparer.
    pub disks: FakeDisks,
    /// Its guest channel.
    pub guests: FakeGuests,
    /// The scratch directory (state, base image, role package).
    pub dir: tempfile::TempDir,
    /// The cached base image's reference.
    pub image: String,
    /// The role package.
    pub role: std::path::PathBuf,
}

/// The agent config of the fake-backed tests: an 8-vCPU, 4 GiB node.
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
    // Role packages and imports come from the test's temporary directory.
    cfg.role_roots = vec![dir.to_path_buf()];
    cfg.import_roots = vec![dir.to_path_buf()];
    cfg
}

/// The fakes as the agent's backends.
pub fn backends(l: &FakeLauncher, d: &FakeDisks, g: &FakeGuests) -> Backends {
    Backends {
        launcher: Arc::new(l.clone()),
        disks: Arc::new(d.clone()),
        guests: Arc::new(g.clone()),
        net: Arc::new(agent::backend::fake::FakeNet::new()),
    }
}

/// An agent on fakes with the default test config.
pub async fn harness() -> FakeAgent {
    harness_with(|_| {}).await
}

/// An agent on fakes, its config changed by `f` before it opens.
pub async fn harness_with(f: impl FnOnce(&mut AgentConfig)) -> FakeAgent {
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
    FakeAgent {
        agent,
        launcher,
        disks,
        guests,
        image: info.reference(),
        role,
        dir,
    }
}

impl FakeAgent {
    /// A web-role instance of 1 vCPU and 256 MiB.
    pub fn spec(&self, id: &str) -> InstanceSpec {
        InstanceSpec {
            resource_disk_mib: 100,
            env: [("MODE".to_string(), "test".to_string())].into(),
            ..super::web_instance(id, &self.image, &self.role, 256, 1000)
        }
    }

    /// A goal of [`Self::spec`] instances.
    pub fn goal(&self, incarnation: u64, ids: &[&str]) -> GoalState {
        GoalState {
            incarnation,
            instances: ids.iter().map(|i| self.spec(i)).collect(),
        }
    }

    /// Waits (at most 600 s of the tests' paused clock) for `id` to reach `state`.
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

    /// Waits for `id` to be removed.
    pub async fn wait_gone(&self, id: &str) {
        assert!(
            self.agent
                .wait_for(id, Duration::from_secs(600), |s| s.is_none())
                .await
                .is_none(),
            "{id} was not removed"
        );
    }

    /// `id`'s transitions as (from, to) pairs.
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
