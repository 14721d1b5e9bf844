//! Shared pieces of the host-agent benchmarks (`agent-*` binaries):
//!
//! - [`KvmAgent`]: the agent library in-process on this host's KVM with its
//!   real backends (`reddog-vmm` processes, `vhd` disks, the vsock guest
//!   channel), its REST API served on a unix socket exactly as the
//!   `reddog-agent` daemon serves it, and timing wrappers round the launcher
//!   and the disk preparer (pure delegation plus a timestamp);
//! - [`DirectVm`]: the same VM (same `VmConfig`, disks made beforehand) spawned
//!   straight from `reddog-vmm`, with our own listener on its vsock socket: the
//!   "no agent" reference;
//! - guest-protocol helpers and the process's CPU time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::api::client::ApiClient;
use agent::backend::disks::{DiskRequest, PreparedDisks};
use agent::backend::process::{ProcessLauncher, ProcessLauncherConfig};
use agent::backend::vhd_disks::VhdDiskPreparer;
use agent::backend::vmm::{LaunchSpec, VmmError, VmmHandle, VmmLauncher, VmmRecord};
use agent::backend::vsock_guest::VsockGuestChannel;
use agent::node::DEFAULT_GUEST_PORT;
use agent::{
    Agent, AgentConfig, Backends, Capacity, DiskPreparer, GoalState, InstanceSpec, NodeConfig,
};
use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use guest_proto::{Decoded, Frame, GuestMsg, HostMsg, StreamDecoder, MAX_FRAME_LEN};
use testkit::test_guest::Cmdline;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The test guest's command line (a launcher template): its vsock window
/// comes after the three disks (OS, resource, role), as in
/// `agent/tests/e2e_kvm.rs`.
pub fn guest_cmdline() -> String {
    Cmdline::new()
        .quiet()
        .exit_acpi()
        .no_smp()
        .vsock_for_disks(3)
        .agent_port_template()
        .to_string()
}

/// `--vmm PATH`, or `reddog-vmm` next to this binary, or the static build
/// `scripts/bench-boot` makes (`<target>/x86_64-unknown-linux-gnu/release`).
pub fn find_vmm(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        if !p.exists() {
            bail!("{} does not exist", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = exe.parent().context("binary has no parent directory")?;
    let candidates = [
        dir.join("reddog-vmm"),
        dir.join("../x86_64-unknown-linux-gnu/release/reddog-vmm"),
    ];
    for c in &candidates {
        if c.exists() {
            return Ok(c.clone());
        }
    }
    bail!(
        "reddog-vmm not found next to {} (build it with `cargo build --release -p vmm`) or pass --vmm PATH",
        exe.display()
    )
}

/// The cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, exclusively borrowed out-pointer for the call.
    let r = unsafe { libc::getrusage(who, &mut u) };
    assert_eq!(r, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// User + system CPU time of this process (all its threads), from `getrusage`.
pub fn cpu_time_self() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// User + system CPU time of this process's reaped children.
pub fn cpu_time_children() -> Duration {
    rusage(libc::RUSAGE_CHILDREN)
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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
    inner: ProcessLauncher,
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
}

struct TimedDisks {
    inner: VhdDiskPreparer,
    log: SeamLog,
}

#[async_trait]
impl DiskPreparer for TimedDisks {
    async fn prepare(
        &self,
        req: &DiskRequest,
    ) -> Result<PreparedDisks, agent::backend::disks::DiskPrepError> {
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
        which: agent::backend::disks::DiskSet,
    ) -> Result<PreparedDisks, agent::backend::disks::DiskPrepError> {
        self.inner.remake(req, current, which).await
    }
}

/// What [`KvmAgent::start`] needs.
#[derive(Debug, Clone)]
pub struct KvmAgentOptions {
    /// The `reddog-vmm` binary.
    pub vmm: PathBuf,
    /// Node capacity in vCPUs (instances take 1 each).
    pub vcpus: u32,
    /// Node capacity in MiB.
    pub memory_mib: u64,
    /// Most instances.
    pub max_instances: usize,
    /// From VMM start to the guest's hello.
    pub boot_timeout: Duration,
}

/// The agent on real backends, in this process, with the REST API on a unix
/// socket.
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
    /// How the agent runs `reddog-vmm` (the direct reference uses the same).
    pub launcher: ProcessLauncherConfig,
    dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for KvmAgent {
    fn drop(&mut self) {
        self.server.abort();
        self.agent.shutdown();
    }
}

/// Sends the agent's tracing output (info level, as the daemon logs by
/// default) to `path`.
pub fn log_to_file(path: &Path) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("REDDOG_LOG").unwrap_or_else(|_| "info".into()),
        ))
        .with_writer(Mutex::new(f))
        .with_ansi(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("tracing: {e}"))
}

impl KvmAgent {
    /// Opens an agent on a fresh state directory under /tmp (short: unix
    /// socket paths), imports the base image, makes the role package and
    /// serves the API on `<dir>/agent.sock`.
    pub async fn start(opts: &KvmAgentOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("rdg-ab")
            .tempdir_in("/tmp")
            .context("tempdir")?;
        log_to_file(&dir.path().join("agent.log"))?;
        let node = NodeConfig {
            max_instances: opts.max_instances,
            ..NodeConfig::new(
                "node-bench",
                Capacity {
                    vcpus: opts.vcpus,
                    memory_mib: opts.memory_mib,
                    disk_mib: 100_000,
                },
            )
        };
        let mut cfg = AgentConfig::new(dir.path().join("state"), node);
        cfg.health.boot_timeout = opts.boot_timeout;
        cfg.event_capacity = 16_384;
        let mut launcher = ProcessLauncherConfig::new(&opts.vmm, test_guest::elf_path());
        launcher.cmdline = guest_cmdline();
        let seams = SeamLog::default();
        let backends = Backends {
            launcher: Arc::new(TimedLauncher {
                inner: ProcessLauncher::new(launcher.clone()),
                log: seams.clone(),
            }),
            disks: Arc::new(TimedDisks {
                inner: VhdDiskPreparer,
                log: seams.clone(),
            }),
            guests: Arc::new(VsockGuestChannel::default()),
        };
        let agent = Agent::open(cfg, backends)
            .await
            .context("opening the agent")?;
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 4 << 20]).context("base image")?;
        let image = agent
            .image_cache()
            .import_file(&base, vmm_api::DiskFormat::Raw, None)
            .context("importing the base image")?
            .reference();
        let role = dir.path().join("role");
        std::fs::create_dir(&role).context("role dir")?;
        std::fs::write(role.join("index.html"), "<h1>reddog</h1>\n").context("role file")?;
        let sock = dir.path().join("agent.sock");
        let server = agent::api::serve_unix(agent.clone(), &sock).context("serving the API")?;
        let api = ApiClient::new(&sock);
        let ok = api.call(hyper::Method::GET, "/healthz", None).await?;
        if ok.trim() != "ok" {
            bail!("GET /healthz answered {ok:?}");
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
        InstanceSpec {
            id: id.into(),
            role: "web".into(),
            base_image: self.image.clone(),
            role_package: self.role.clone(),
            vcpus: 1,
            memory_mib,
            resource_disk_mib: 16,
            env: Default::default(),
            heartbeat_interval_ms,
            disk_rate_limit: None,
        }
    }

    /// `PUT /v1/goal` over the unix socket; returns the agent's answer
    /// (`ApplyOutcome` as JSON). Fails on any non-2xx answer.
    pub async fn put_goal(&self, goal: &GoalState) -> Result<serde_json::Value> {
        let body = serde_json::to_vec(goal)?;
        let text = self
            .api
            .call(hyper::Method::PUT, "/v1/goal", Some(body))
            .await
            .context("PUT /v1/goal")?;
        serde_json::from_str(&text).with_context(|| format!("PUT /v1/goal answered {text:?}"))
    }
}

/// Encodes a guest message at protocol version 1.
pub fn encode_guest(msg: &GuestMsg<'_>) -> Result<Vec<u8>> {
    let mut out = [0u8; MAX_FRAME_LEN];
    let n = msg
        .encode(1, &mut out)
        .map_err(|e| anyhow::anyhow!("encoding {msg:?}: {e}"))?;
    Ok(out[..n].to_vec())
}

/// Encodes a host message at protocol version 1.
pub fn encode_host(msg: &HostMsg) -> Result<Vec<u8>> {
    let mut out = [0u8; MAX_FRAME_LEN];
    let n = msg
        .encode(1, &mut out)
        .map_err(|e| anyhow::anyhow!("encoding {msg:?}: {e}"))?;
    Ok(out[..n].to_vec())
}

/// What the host side of [`DirectVm`] saw.
#[derive(Debug, Clone, Copy)]
pub enum Seen {
    /// `Hello`.
    Hello,
    /// A heartbeat with this sequence number.
    Heartbeat(u64),
    /// `Ready`.
    Ready,
    /// Something else (skipped).
    Other,
}

/// Reads the next guest frame from `s`.
pub async fn read_guest_frame(s: &mut UnixStream, dec: &mut StreamDecoder) -> Result<Seen> {
    loop {
        match dec.next_frame::<GuestMsg>() {
            Decoded::NeedMore { .. } => {}
            Decoded::Error { error, .. } => bail!("bad frame from the guest: {error}"),
            Decoded::Frame {
                frame: Frame::Known { msg, .. },
                ..
            } => {
                return Ok(match msg {
                    GuestMsg::Hello(_) => Seen::Hello,
                    GuestMsg::Heartbeat(h) => Seen::Heartbeat(h.seq),
                    GuestMsg::Ready => Seen::Ready,
                    _ => Seen::Other,
                })
            }
            Decoded::Frame { .. } => return Ok(Seen::Other),
        }
        let n = s.read(dec.spare_mut()).await?;
        if n == 0 {
            bail!("the guest closed the connection");
        }
        dec.commit(n);
    }
}

/// One test-guest VM spawned straight from `reddog-vmm` (no agent): its own
/// `VmConfig` built by the agent's launcher code over disks made beforehand.
pub struct DirectVm {
    child: tokio::process::Child,
    stream: Option<UnixStream>,
    dec: StreamDecoder,
    /// Before the spawn.
    pub t0: Instant,
    /// Spawn returned.
    pub spawned: Duration,
    /// `Hello` read.
    pub hello: Option<Duration>,
    /// First heartbeat read.
    pub first_heartbeat: Option<Duration>,
}

/// A prepared direct VM: its directory, `vm.json` and vsock socket.
#[derive(Debug, Clone)]
pub struct DirectSetup {
    /// Its directory.
    pub dir: PathBuf,
    /// The `VmConfig`.
    pub config: PathBuf,
    /// The VMM's vsock socket.
    pub uds: PathBuf,
}

impl DirectSetup {
    /// Makes the three disks (as the agent does: qcow2 overlay over `base`,
    /// ext4 resource and role disks) and the `VmConfig` the agent's launcher
    /// would write for it, under `dir`.
    pub async fn prepare(
        dir: &Path,
        name: &str,
        base: &Path,
        role: &Path,
        memory_mib: u32,
        launcher: &ProcessLauncherConfig,
    ) -> Result<Self> {
        let vdir = dir.join(name);
        std::fs::create_dir_all(vdir.join("disks"))?;
        let disks = VhdDiskPreparer
            .prepare(&DiskRequest {
                instance_id: name.into(),
                role: "bench".into(),
                env: Default::default(),
                dir: vdir.join("disks"),
                base: base.to_path_buf(),
                base_format: vmm_api::DiskFormat::Raw,
                role_package: role.to_path_buf(),
                resource_disk_bytes: 16 << 20,
            })
            .await
            .context("making the direct VM's disks")?;
        let uds = vdir.join("v.vsock");
        let spec = LaunchSpec {
            instance_id: name.into(),
            dir: vdir.clone(),
            vcpus: 1,
            memory_mib,
            disks: disks.in_order(),
            vsock: vmm_api::VsockConfig {
                guest_cid: vmm_api::config::MIN_GUEST_CID,
                uds_path: uds.clone(),
            },
            guest_port: DEFAULT_GUEST_PORT,
            serial_path: vdir.join("serial.log"),
        };
        let cfg = ProcessLauncher::new(launcher.clone()).vm_config(&spec);
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("invalid VmConfig: {e}"))?;
        let config = vdir.join("vm.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&cfg)?)?;
        Ok(Self {
            dir: vdir,
            config,
            uds,
        })
    }
}

impl DirectVm {
    /// Listens on `<uds>_<port>`, spawns `reddog-vmm --config`, and waits for
    /// the guest's connection (bounded by `limit`).
    pub async fn start(vmm: &Path, setup: &DirectSetup, limit: Duration) -> Result<Self> {
        let mut listen = setup.uds.clone().into_os_string();
        listen.push(format!("_{DEFAULT_GUEST_PORT}"));
        let listen = PathBuf::from(listen);
        let _ = std::fs::remove_file(&setup.uds);
        let _ = std::fs::remove_file(&listen);
        let listener = UnixListener::bind(&listen)
            .with_context(|| format!("listening on {}", listen.display()))?;
        let log = std::fs::File::create(setup.dir.join("vmm.log"))?;
        let log2 = log.try_clone()?;
        let t0 = Instant::now();
        let child = tokio::process::Command::new(vmm)
            .arg("--config")
            .arg(&setup.config)
            .arg("--exit-report")
            .arg(setup.dir.join("exit-report.json"))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", vmm.display()))?;
        let spawned = t0.elapsed();
        let mut vm = Self {
            child,
            stream: None,
            dec: StreamDecoder::new(),
            t0,
            spawned,
            hello: None,
            first_heartbeat: None,
        };
        let accepted = tokio::time::timeout(limit, listener.accept()).await;
        match accepted {
            Ok(Ok((s, _))) => vm.stream = Some(s),
            Ok(Err(e)) => bail!("accept: {e}"),
            Err(_) => {
                let _ = vm.child.start_kill();
                bail!(
                    "the guest did not connect within {limit:?}; see {}",
                    setup.dir.display()
                )
            }
        }
        Ok(vm)
    }

    /// Reads `Hello`, answers `HelloAck` and reads up to the first heartbeat.
    pub async fn first_heartbeat(&mut self, interval_ms: u32, limit: Duration) -> Result<()> {
        let t0 = self.t0;
        let stream = self.stream.as_mut().context("not connected")?;
        let dec = &mut self.dec;
        let mut hello = None;
        let fut = async {
            loop {
                match read_guest_frame(stream, dec).await? {
                    Seen::Hello => {
                        hello = Some(t0.elapsed());
                        let ack = encode_host(&HostMsg::HelloAck(guest_proto::HelloAck {
                            version: 1,
                            heartbeat_interval_ms: interval_ms,
                        }))?;
                        stream.write_all(&ack).await?;
                    }
                    Seen::Heartbeat(_) => return Ok::<_, anyhow::Error>(t0.elapsed()),
                    Seen::Ready | Seen::Other => {}
                }
            }
        };
        let hb = tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| anyhow::anyhow!("no heartbeat within {limit:?}"))??;
        self.hello = hello;
        self.first_heartbeat = Some(hb);
        if self.hello.is_none() {
            bail!("a heartbeat before Hello");
        }
        Ok(())
    }

    /// Asks the guest to shut down (`Shutdown`: ACPI power-off) and waits for
    /// the VMM to exit; kills it after `limit`. Returns the exit status.
    pub async fn shutdown(mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        if let Some(s) = self.stream.as_mut() {
            let msg = encode_host(&HostMsg::Shutdown(guest_proto::Shutdown {
                deadline_ms: 1000,
            }))?;
            let _ = s.write_all(&msg).await;
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(r) => Ok(r?),
            Err(_) => {
                let _ = self.child.start_kill();
                let st = self.child.wait().await?;
                bail!("the VMM did not exit within {limit:?} of Shutdown (killed: {st})")
            }
        }
    }
}
