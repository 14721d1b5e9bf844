//! The host agent's test harness, shared by the agent's and the binaries'
//! tests and by the agent benchmarks (feature `agent`):
//!
//! - [`fakes`]: the agent library on its fake backends in a temporary state
//!   directory, with one cached base image and one role package;
//! - [`kvm`]: the agent library on this host's KVM with its real backends
//!   (`reddog-vmm` processes, `vhd` disks, the vsock guest channel), its REST
//!   API served on a unix socket as the daemon serves it, and timing seams
//!   round the launcher and the disk preparer;
//! - [`direct`]: the same VM spawned straight from `reddog-vmm`, with our own
//!   guest-protocol listener on its vsock socket (the "no agent" reference);
//! - [`daemon`]: a `reddog-agent` child process and its socket;
//! - [`blocking`]: the agent's REST client for synchronous drivers (the
//!   `agent-driver` binary).

pub mod blocking;
pub mod daemon;
pub mod direct;
pub mod fakes;
pub mod kvm;

/// What a harness step could not do. Test support: the message names the
/// step, and the source says why.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A file or process operation.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The agent library or its API refused.
    #[error("{what}: {source}")]
    Agent {
        /// The step.
        what: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Something the harness checks did not hold.
    #[error("{0}")]
    Failed(String),
}

impl HarnessError {
    /// Wraps an I/O error with the step it broke.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// Wraps an agent (or other library) error with the step it broke.
    pub fn agent<E: std::error::Error + Send + Sync + 'static>(
        what: impl Into<String>,
    ) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |source| Self::Agent {
            what,
            source: Box::new(source),
        }
    }
}

/// A 4 MiB raw base image of zeros at `path` and a role package directory
/// (`role/index.html`) beside it: what the KVM tests and benchmarks boot the
/// test guest over. Returns the role directory.
pub fn write_base_and_role(
    base: &std::path::Path,
    dir: &std::path::Path,
) -> Result<std::path::PathBuf, HarnessError> {
    std::fs::write(base, vec![0u8; 4 << 20]).map_err(HarnessError::io("writing the base image"))?;
    let role = dir.join("role");
    std::fs::create_dir(&role).map_err(HarnessError::io("making the role package"))?;
    std::fs::write(role.join("index.html"), "<h1>reddog</h1>\n")
        .map_err(HarnessError::io("writing the role package"))?;
    Ok(role)
}

/// A web-role instance of 1 vCPU with a 16 MiB resource disk and no
/// environment, over `image` with the role package `role`.
pub fn web_instance(
    id: &str,
    image: &str,
    role: &std::path::Path,
    memory_mib: u32,
    heartbeat_interval_ms: u32,
) -> agent::InstanceSpec {
    agent::InstanceSpec {
        id: id.into(),
        role: "web".into(),
        base_image: image.into(),
        role_package: role.to_owned(),
        vcpus: 1,
        memory_mib,
        resource_disk_mib: 16,
        env: Default::default(),
        heartbeat_interval_ms,
        disk_rate_limit: None,
    }
}
