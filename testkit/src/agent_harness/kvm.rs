//! The agent library in-process on this host's KVM with its real backends:
//! `reddog-vmm` processes, `vhd` disks (qcow2 overlay, ext4 resource and role
//! disks), the vsock guest channel, and the tiny test guest in place of a
//! Linux guest. Its REST API is served on a unix socket exactly as the
//! `reddog-agent` daemon serves it. The launcher and the disk preparer are
//! wrapped in timing seams (pure delegation plus a timestamp) for the
//! benchmarks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agent::api::client::ApiClient;
use agent::backend::disks::{DiskPrepError, DiskRequest, DiskSet, PreparedDisks};
use agent::backend::process::{ProcessLauncher, ProcessLauncherConfig};
use agent::backend::vhd_disks::VhdDiskPreparer;
use agent::backend::vmm::{LaunchSpec, VmmError, VmmHandle, VmmLauncher, VmmRecord};
use agent::backend::vsock_guest::{GuestLimits, VsockGuestChannel};
use agent::{
    Agent, AgentConfig, Backends, Capacity, DiskPreparer, GoalState, InstanceSpec, NodeConfig,
};
use async_trait::async_trait;

use super::HarnessError;
use crate::test_guest::Cmdline;

/// The test guest as the agent launches it: quiet, powering off through
/// ACPI, one vCPU, its vsock agent on the window after the three disks (OS,
/// resource, role), on the instance's port (a launcher template).
pub fn guest_cmdline() -> Cmdline {
    Cmdline::new()
        .quiet()
        .exit_acpi()
        .no_smp()
        .vsock_for_disks(3)
        .agent_port_template()
}

/// When the agent's seams did their work for one instance (the latest launch).
#[derive(Debug, Clone, Copy, Default)]
pub struct SeamTimes {
    /// The agent asked for the disks.
    pub disks_start: Option<Instant>,
    /// The disks were made.
    pub disks_done: Option<Instant>,
    /// The agent asked for a VMM.
    pub launch_start: Option<Instant>,
    /// `reddog-vmm` was spawned (the launcher returned).
    pub launch_done: Option<Instant>,
}

/// Seam timestamps by instance id.
#[derive(Debug, Clone, Default)]
pub struct SeamLog(Arc<Mutex<HashMap<String, SeamTimes>>>);

impl SeamLog {
    fn note(&self, id: &str, f: impl FnOnce(&mut SeamTimes)) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(id.to_string()).or_default());
    }

    /// The times recorded for `id`.
    pub fn get(&self, id: &str) -> SeamTimes {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or_default()
    }
}

struct TimedLauncher {
    inner: Arc<dyn VmmLauncher>,
    log: SeamLog,
}

#[async_trait]
impl VmmLauncher for TimedLauncher {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmHandle>, VmmError> {
        self.log
            .note(&spec.instance_id, |t| t.launch_start = Some(Instant::now()));
        let r = self.inner.launch(spec).await;
        self.log
            .note(&spec.instance_id, |t| t.launch_done = Some(Instant::now()));
        r
    }

    async fn adopt(
        &self,
        spec: &LaunchSpec,
        record: &VmmRecord,
    ) -> Result<Box<dyn VmmHandle>, VmmError> {
        self.inner.adopt(spec, record).await
    }

    async fn recover(&self, spec: &LaunchSpec) -> Option<VmmRecord> {
        self.inner.recover(spec).await
    }

    fn remove(&self, spec: &LaunchSpec) {
        self.inner.remove(spec);
    }
}

struct TimedDisks {
    inner: VhdDiskPreparer,
    log: SeamLog,
}

#[async_trait]
impl DiskPreparer for TimedDisks {
    async fn prepare(&self, req: &DiskRequest) -> Result<PreparedDisks, DiskPrepError> {
        self.log
            .note(&req.instance_id, |t| t.disks_start = Some(Instant::now()));
        let r = self.inner.prepare(req).await;
        self.log
            .note(&req.instance_id, |t| t.disks_done = Some(Instant::now()));
        r
    }

    async fn remake(
        &self,
        req: &DiskRequest,
        current: &PreparedDisks,
        which: DiskSet,
    ) -> Result<PreparedDisks, DiskPrepError> {
        self.inner.remake(req, current, which).await
    }
}

/// Makes the launcher from the config the harness built (the `reddog-vmm`
/// binary, the test guest, [`guest_cmdline`]) and the scratch directory
/// (the state directory is its `state`).
pub type MakeLauncher =
    Box<dyn FnOnce(&ProcessLauncherConfig, &Path) -> Arc<dyn VmmLauncher> + Send>;

/// What [`KvmAgent::start`] needs.
pub struct KvmAgentOptions {
    /// The `reddog-vmm` binary.
    pub vmm: PathBuf,
    /// Node capacity in vCPUs.
    pub vcpus: u32,
    /// Node capacity in MiB.
    pub memory_mib: u64,
    /// Most instances.
    pub max_instances: usize,
    /// Prefix of the scratch directory under /tmp (short: unix socket paths).
    pub dir_prefix: &'static str,
    /// Changes the agent's config before it opens (health policy, events).
    pub configure: Box<dyn FnOnce(&mut AgentConfig) + Send>,
    /// The launcher; a [`ProcessLauncher`] over the harness's config when
    /// `None`.
    pub launcher: Option<MakeLauncher>,
    /// Send the process's tracing output to `<dir>/agent.log` ([`log_to_file`]).
    pub log_to_file: bool,
}

impl KvmAgentOptions {
    /// An agent over `vmm` on a node of `vcpus` vCPUs and `memory_mib` MiB,
    /// with the default config and launcher.
    pub fn new(vmm: impl Into<PathBuf>, vcpus: u32, memory_mib: u64) -> Self {
        Self {
            vmm: vmm.into(),
            vcpus,
            memory_mib,
            max_instances: NodeConfig::new(
                "n",
                Capacity {
                    vcpus,
                    memory_mib,
                    disk_mib: 1,
                },
            )
            .max_instances,
            dir_prefix: "rdg-ka",
            configure: Box::new(|_| {}),
            launcher: None,
            log_to_file: false,
        }
    }
}

/// The agent on real backends, in this process, with the REST API on a unix
/// socket. Dropping it stops the API, shuts the agent down and kills every
/// VMM it left running (the agent leaves VMMs running when it stops, by
/// design; a test's or a benchmark's must not outlive it).
pub struct KvmAgent {
    /// The agent.
    pub agent: Agent,
    /// A client for its REST API.
    pub api: ApiClient,
    /// The API socket.
    pub sock: PathBuf,
    /// The base image reference (`sha256:...`), 4 MiB of zeros, raw.
    pub image: String,
    /// The base image file (outside the cache).
    pub base: PathBuf,
    /// The role package directory.
    pub role: PathBuf,
    /// Seam timestamps.
    pub seams: SeamLog,
    /// How the harness runs `reddog-vmm` (the direct reference uses the same).
    pub launcher: ProcessLauncherConfig,
    dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for KvmAgent {
    fn drop(&mut self) {
        self.server.abort();
        let pids: Vec<i32> = self
            .agent
            .instances()
            .iter()
            .filter_map(|s| s.vmm_pid)
            .collect();
        self.agent.shutdown();
        for pid in pids {
            // The VMM may have gone already; a failed kill is no error here.
            let _ = rustix::process::Pid::from_raw(pid)
                .map(|p| rustix::process::kill_process(p, rustix::process::Signal::KILL));
        }
    }
}

/// Sends the agent's tracing output (info level, as the daemon logs by
/// default; `REDDOG_LOG` overrides) to `path`.
pub fn log_to_file(path: &Path) -> Result<(), HarnessError> {
    let f = std::fs::File::create(path)
        .map_err(HarnessError::io(format!("creating {}", path.display())))?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("REDDOG_LOG").unwrap_or_else(|_| "info".into()),
        ))
        .with_writer(Mutex::new(f))
        .with_ansi(false)
        .try_init()
        .map_err(|e| HarnessError::Failed(format!("tracing: {e}")))
}

impl KvmAgent {
    /// Opens an agent on a fresh state directory under /tmp, imports the
    /// base image, makes the role package and serves the API on
    /// `<dir>/agent.sock`.
    pub async fn start(opts: KvmAgentOptions) -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix(opts.dir_prefix)
            .tempdir_in("/tmp")
            .map_err(HarnessError::io("making the scratch directory"))?;
        if opts.log_to_file {
            log_to_file(&dir.path().join("agent.log"))?;
        }
        let node = NodeConfig {
            max_instances: opts.max_instances,
            ..NodeConfig::new(
                "node-kvm",
                Capacity {
                    vcpus: opts.vcpus,
                    memory_mib: opts.memory_mib,
                    disk_mib: 100_000,
                },
            )
        };
        let mut cfg = AgentConfig::new(dir.path().join("state"), node);
        // The role package is made in the harness's directory.
        cfg.role_roots = vec![dir.path().to_owned()];
        (opts.configure)(&mut cfg);
        let mut launcher = ProcessLauncherConfig::new(&opts.vmm, test_guest::elf_path());
        launcher.cmdline = guest_cmdline().to_string();
        let inner: Arc<dyn VmmLauncher> = match opts.launcher {
            Some(make) => make(&launcher, dir.path()),
            None => Arc::new(ProcessLauncher::new(launcher.clone())),
        };
        let seams = SeamLog::default();
        let backends = Backends {
            launcher: Arc::new(TimedLauncher {
                inner,
                log: seams.clone(),
            }),
            disks: Arc::new(TimedDisks {
                inner: VhdDiskPreparer,
                log: seams.clone(),
            }),
            guests: Arc::new(VsockGuestChannel::new(GuestLimits::default())),
            net: Arc::new(agent::backend::host_net::HostNetwork::default()),
        };
        let agent = Agent::open(cfg, backends)
            .await
            .map_err(HarnessError::agent("opening the agent"))?;
        let base = dir.path().join("base.raw");
        let role = super::write_base_and_role(&base, dir.path())?;
        let image = agent
            .image_cache()
            .import_file(&base, vmm_api::DiskFormat::Raw, None)
            .map_err(HarnessError::agent("importing the base image"))?
            .reference();
        let sock = dir.path().join("agent.sock");
        let server = agent::api::serve_unix(agent.clone(), &sock)
            .map_err(HarnessError::agent("serving the API"))?;
        let api = ApiClient::new(&sock);
        let ok = api
            .call(hyper::Method::GET, "/healthz", None)
            .await
            .map_err(HarnessError::agent("GET /healthz"))?;
        if ok.trim() != "ok" {
            return Err(HarnessError::Failed(format!(
                "GET /healthz answered {ok:?}"
            )));
        }
        Ok(Self {
            agent,
            api,
            sock,
            image,
            base,
            role,
            seams,
            launcher,
            dir,
            server,
        })
    }

    /// The scratch directory (state, logs, base image).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An instance: 1 vCPU, `memory_mib`, a 16 MiB resource disk.
    pub fn spec(&self, id: &str, memory_mib: u32, heartbeat_interval_ms: u32) -> InstanceSpec {
        super::web_instance(
            id,
            &self.image,
            &self.role,
            memory_mib,
            heartbeat_interval_ms,
        )
    }

    /// `PUT /v1/goal` over the unix socket; returns the agent's answer
    /// (`ApplyOutcome` as JSON). Fails on any non-2xx answer.
    pub async fn put_goal(&self, goal: &GoalState) -> Result<serde_json::Value, HarnessError> {
        let body = serde_json::to_vec(goal).map_err(HarnessError::agent("encoding the goal"))?;
        let text = self
            .api
            .call(hyper::Method::PUT, "/v1/goal", Some(body))
            .await
            .map_err(HarnessError::agent("PUT /v1/goal"))?;
        serde_json::from_str(&text).map_err(|e| {
            HarnessError::Failed(format!("PUT /v1/goal answered {text:?}, not JSON: {e}"))
        })
    }
}
