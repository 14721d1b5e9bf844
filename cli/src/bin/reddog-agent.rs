//! `reddog-agent`: the host agent daemon. A thin layer over `agent::Agent`:
//! flags -> config, the REST API on a unix socket (and TCP when asked),
//! upstream node reports, logs as text or JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agent::backend::fake::{FakeDisks, FakeGuests, FakeLauncher};
use agent::backend::process::{ProcessLauncher, ProcessLauncherConfig};
use agent::{Agent, AgentConfig, Backends, Capacity, NodeConfig};
use anyhow::Context;
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The reddog host agent.
#[derive(Debug, Parser)]
#[command(name = "reddog-agent", version)]
struct Args {
    /// State directory: records, disks, image cache, sockets.
    #[arg(long, default_value = "/var/lib/reddog")]
    state_dir: PathBuf,
    /// API unix socket [default: <state-dir>/agent.sock].
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Also serve the API on this TCP address, behind TLS (--tls-cert,
    /// --tls-key) with client certificates (--tls-client-ca) or a bearer
    /// token (--api-token-file); refused without them.
    #[arg(long)]
    listen: Option<String>,
    /// The TCP listener's certificate chain (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// The TCP listener's private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) TCP clients' certificates must chain to.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// A file (mode 0600) holding the bearer token TCP clients send as
    /// `Authorization: Bearer <token>` (with --tls-client-ca: instead of a
    /// certificate).
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Also let this uid use the unix socket (root and the agent's own uid
    /// always may). Repeatable.
    #[arg(long)]
    api_allow_uid: Vec<u32>,
    /// Also let peers with this (effective) gid use the unix socket.
    /// Repeatable.
    #[arg(long)]
    api_allow_gid: Vec<u32>,
    /// Give the unix socket this group and mode 0660 (default: 0600).
    #[arg(long)]
    api_socket_group: Option<u32>,
    /// A directory goal role packages must lie under (after `..` and
    /// symlinks are resolved). Repeatable [default: <state-dir>/roles].
    #[arg(long)]
    role_root: Vec<PathBuf>,
    /// A directory files imported through the API (`reddog cache import
    /// PATH`) must lie under. Repeatable [default: <state-dir>/imports].
    #[arg(long)]
    import_root: Vec<PathBuf>,
    /// Node id [default: the host name].
    #[arg(long)]
    node_id: Option<String>,
    /// Fault domain.
    #[arg(long, default_value_t = 0)]
    fault_domain: u32,
    /// Update domain.
    #[arg(long, default_value_t = 0)]
    update_domain: u32,
    /// vCPUs for instances [default: the host's CPUs].
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory for instances, MiB [default: 7/8 of the host's].
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Disk for resource disks, MiB.
    #[arg(long, default_value_t = 100 * 1024)]
    disk_mib: u64,
    /// Most instances.
    #[arg(long, default_value_t = agent::spec::DEFAULT_MAX_INSTANCES)]
    max_instances: usize,
    /// The instances' IPv4 subnet, one /30 per instance (e.g. 10.200.0.0/16);
    /// without it instances get no network interface.
    #[arg(long)]
    instance_subnet: Option<agent::network::Subnet>,
    /// MTU of every instance's TAP and eth0.
    #[arg(long, default_value_t = agent::network::DEFAULT_INSTANCE_MTU)]
    instance_mtu: u16,
    /// Default disk rate limit, bytes per second per disk, for instances whose
    /// spec sets no disk_rate_limit (a burst of one second's worth).
    #[arg(long)]
    disk_rate_bytes: Option<u64>,
    /// Default disk rate limit, requests per second per disk (as above).
    #[arg(long)]
    disk_rate_ops: Option<u64>,
    /// Push node reports to this http:// URL.
    #[arg(long)]
    upstream_url: Option<String>,
    /// Seconds between node reports.
    #[arg(long, default_value_t = 10)]
    upstream_interval_secs: u64,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// The reddog-vmm binary.
    #[arg(long, default_value = "reddog-vmm")]
    vmm_binary: PathBuf,
    /// Guest kernel.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs (reddog-guest as /init).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line ({vsock_port} and {instance_id} are replaced).
    #[arg(long)]
    cmdline: Option<String>,
    /// Do not give each reddog-vmm a control socket (graceful stops then go
    /// straight to SIGTERM instead of the guest's ACPI power button).
    #[arg(long)]
    no_vmm_control_socket: bool,
    /// Host vsock port the guest agent connects to.
    #[arg(long, default_value_t = agent::node::DEFAULT_GUEST_PORT)]
    guest_port: u32,
    /// Seconds from VMM start to the guest's hello.
    #[arg(long, default_value_t = 60)]
    boot_timeout_secs: u64,
    /// Missed heartbeat intervals before a restart.
    #[arg(long, default_value_t = 3)]
    missed_heartbeats: u32,
    /// Most API connections served at once, per listener (unix, TCP); more
    /// are closed at once. Capped at a quarter of the open-file limit.
    #[arg(long, default_value_t = agent::api::DEFAULT_MAX_CONNECTIONS)]
    api_max_connections: usize,
    /// Seconds an API connection may take to send a request's head (also
    /// the idle time of a kept-alive connection) before it is closed.
    #[arg(long, default_value_t = agent::api::DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    api_header_timeout_secs: u64,
    /// The reddog-jailer binary every VMM is started through
    /// [default: reddog-jailer beside this binary, else on PATH].
    #[arg(long)]
    jailer: Option<PathBuf>,
    /// Run the VMMs unjailed, as root with the agent's view of the host
    /// (development only: logs a warning).
    #[arg(long)]
    no_jail: bool,
    /// The jails' base directory [default: <state-dir>/jail].
    #[arg(long)]
    jail_dir: Option<PathBuf>,
    /// The first uid (and gid) of the VMMs' range; one per live instance.
    #[arg(long, default_value_t = agent::backend::process::DEFAULT_FIRST_UID)]
    jail_uid_first: u32,
    /// How many uids the VMMs' range holds.
    #[arg(long, default_value_t = agent::backend::process::DEFAULT_UID_COUNT)]
    jail_uid_count: u32,
    /// The parent cgroup of the VMMs' cgroups [default: reddog/<a hash of the
    /// state directory>, so two agents never share one].
    #[arg(long)]
    jail_cgroup_parent: Option<PathBuf>,
    /// Memory a VMM may use beside its guest's (its cgroup's memory limit
    /// is the guest memory plus this), MiB.
    #[arg(long, default_value_t = 128)]
    vmm_memory_overhead_mib: u64,
    /// Run with fake VMMs, disks and guests (tests and demos without KVM).
    #[arg(long, hide = true)]
    fake: bool,
}

/// An absolute path to a program: as given when it holds a `/`, else the
/// first match on `PATH`.
fn resolve_program(p: &std::path::Path) -> anyhow::Result<PathBuf> {
    if p.components().count() > 1 || p.is_absolute() {
        return Ok(std::fs::canonicalize(p)?);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
        .map(|c| std::fs::canonicalize(&c))
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("{} is not on PATH", p.display()))
}

/// Eight hex digits naming a state directory (FNV-1a of its absolute path).
fn state_hash(state: &std::path::Path) -> String {
    let _ = std::fs::create_dir_all(state);
    let abs = std::fs::canonicalize(state).unwrap_or_else(|_| state.to_owned());
    let mut h: u32 = 0x811c_9dc5;
    for b in abs.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024 * 7 / 8)
        .unwrap_or(1024)
}

fn init_logging(f: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REDDOG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match f {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one: every instance holds
/// fds (disks, sockets, `/proc` reads) and the usual soft limit of 1024 is
/// soon reached.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let old = getrlimit(Resource::Nofile);
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    if old.current == old.maximum {
        tracing::info!(
            soft = %show(old.current),
            hard = %show(old.maximum),
            "open-file limit (RLIMIT_NOFILE) already at the hard limit"
        );
        return;
    }
    let new = Rlimit {
        current: old.maximum,
        maximum: old.maximum,
    };
    match setrlimit(Resource::Nofile, new) {
        Ok(()) => tracing::info!(
            soft = %show(old.current),
            hard = %show(old.maximum),
            "raised the open-file limit (RLIMIT_NOFILE) from the soft to the hard limit"
        ),
        Err(e) => tracing::warn!(
            soft = %show(old.current),
            hard = %show(old.maximum),
            "cannot raise the open-file limit (RLIMIT_NOFILE) to the hard limit: {e}"
        ),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Everything the agent and its VMMs create (records, disks, logs,
    // sockets) is owner-only unless made otherwise on purpose.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    init_logging(args.log_format);
    raise_fd_limit();
    let node_id = args.node_id.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "node".into())
    });
    let capacity = Capacity {
        vcpus: args.vcpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(1))
                .unwrap_or(1)
        }),
        memory_mib: args.memory_mib.unwrap_or_else(host_memory_mib),
        disk_mib: args.disk_mib,
    };
    let mut node = NodeConfig::new(node_id, capacity);
    node.fault_domain = args.fault_domain;
    node.update_domain = args.update_domain;
    node.max_instances = args.max_instances;
    node.instance_subnet = args.instance_subnet;
    node.instance_mtu = args.instance_mtu;
    let bucket = |per_second| vmm_api::TokenBucket {
        per_second,
        burst: None,
    };
    let limit = vmm_api::RateLimit {
        bytes: args.disk_rate_bytes.map(bucket),
        ops: args.disk_rate_ops.map(bucket),
    };
    if limit != vmm_api::RateLimit::default() {
        limit
            .validate()
            .map_err(|e| anyhow::anyhow!("--disk-rate-bytes / --disk-rate-ops: {e}"))?;
        node.default_disk_rate_limit = Some(limit);
    }
    let mut cfg = AgentConfig::new(&args.state_dir, node);
    cfg.guest_port = args.guest_port;
    cfg.health.boot_timeout = Duration::from_secs(args.boot_timeout_secs);
    cfg.health.missed_heartbeats = args.missed_heartbeats;
    if !args.role_root.is_empty() {
        cfg.role_roots = args.role_root.clone();
    }
    if !args.import_root.is_empty() {
        cfg.import_roots = args.import_root.clone();
    }
    let backends = if args.fake {
        tracing::warn!("running with fake VMMs, disks and guests");
        let l = FakeLauncher::new();
        Backends {
            guests: Arc::new(FakeGuests::with_launcher(l.clone())),
            launcher: Arc::new(l),
            disks: Arc::new(FakeDisks::new()),
            net: Arc::new(agent::backend::fake::FakeNet::new()),
        }
    } else {
        let kernel = args
            .kernel
            .clone()
            .context("--kernel is required (the guest kernel every instance boots)")?;
        let mut pl = ProcessLauncherConfig::new(&args.vmm_binary, kernel);
        pl.initrd = args.initrd.clone();
        if let Some(c) = &args.cmdline {
            pl.cmdline = c.clone();
        }
        pl.control_socket = !args.no_vmm_control_socket;
        if args.no_jail {
            tracing::warn!(
                "--no-jail: every VMM runs as root, unconfined; a bug in it is host root"
            );
        } else {
            pl.vmm_binary = resolve_program(&args.vmm_binary).with_context(|| {
                format!("cannot find the VMM binary {}", args.vmm_binary.display())
            })?;
            let jailer = match &args.jailer {
                Some(j) => j.clone(),
                None => std::env::current_exe()
                    .ok()
                    .and_then(|e| Some(e.parent()?.join("reddog-jailer")))
                    .filter(|p| p.is_file())
                    .unwrap_or_else(|| "reddog-jailer".into()),
            };
            let jailer = resolve_program(&jailer).with_context(|| {
                format!(
                    "cannot find the jailer {}; give --jailer (or --no-jail for development)",
                    jailer.display()
                )
            })?;
            let base = args
                .jail_dir
                .clone()
                .unwrap_or_else(|| args.state_dir.join("jail"));
            let mut j = agent::backend::process::JailSettings::new(jailer, base);
            j.first_uid = args.jail_uid_first;
            j.uid_count = args.jail_uid_count;
            j.cgroup.vmm_overhead_mib = args.vmm_memory_overhead_mib;
            j.cgroup.parent = match &args.jail_cgroup_parent {
                Some(p) => p.clone(),
                None => PathBuf::from("reddog").join(state_hash(&args.state_dir)),
            };
            pl.jail = Some(j);
        }
        Backends {
            launcher: Arc::new(ProcessLauncher::new(pl)),
            disks: Arc::new(agent::backend::vhd_disks::VhdDiskPreparer),
            guests: Arc::new(agent::backend::vsock_guest::VsockGuestChannel::default()),
            net: Arc::new(agent::backend::host_net::HostNetwork::default()),
        }
    };
    let agent = Agent::open(cfg, backends)
        .await
        .context("cannot open the state directory")?;
    let sock = args
        .api_socket
        .clone()
        .unwrap_or_else(|| args.state_dir.join("agent.sock"));
    let serve = agent::api::ServeConfig {
        max_connections: args.api_max_connections.max(1),
        header_read_timeout: Duration::from_secs(args.api_header_timeout_secs.max(1)),
        unix_access: agent::api::UnixAccess {
            uids: args.api_allow_uid.clone(),
            gids: args.api_allow_gid.clone(),
            group: args.api_socket_group,
        },
    };
    let tcp = agent::api::TcpSecurity {
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        client_ca: args.tls_client_ca.clone(),
        token_file: args.api_token_file.clone(),
    };
    if args.listen.is_none() && tcp != agent::api::TcpSecurity::default() {
        anyhow::bail!("--tls-cert, --tls-key, --tls-client-ca and --api-token-file are for --listen; give it too");
    }
    let _unix = agent::api::serve_unix_with(agent.clone(), &sock, serve.clone())?;
    tracing::info!(socket = %sock.display(), "API listening");
    if let Some(addr) = &args.listen {
        let (local, _) = agent::api::serve_tcp_with(agent.clone(), addr, serve, &tcp).await?;
        tracing::info!(%local, client_certificates = tcp.client_ca.is_some(), bearer_token = tcp.token_file.is_some(), "API listening on TCP (TLS)");
    }
    if let Some(url) = &args.upstream_url {
        let mut u = agent::upstream::UpstreamConfig::new(url.clone());
        u.interval = Duration::from_secs(args.upstream_interval_secs.max(1));
        agent::upstream::spawn_pusher(agent.clone(), u)?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down; VMMs keep running and are re-adopted at the next start");
    agent.shutdown();
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
