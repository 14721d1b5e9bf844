//! The guest initramfs for real Linux guests: `reddog-guest` (static) as
//! `/init`, plus the kernel's virtio (disk, network) and vsock modules in load order, listed in
//! `/etc/reddog/modules` for `reddog-guest` to load with `finit_module`.

use std::path::Path;

use crate::artifacts::{self, ArtifactError, KernelArtifacts};
use crate::cpio::{CpioError, CpioWriter};

/// The modules a guest needs for virtio-mmio disks, vsock and its network
/// interface (their dependencies, such as `virtio_net`'s `net_failover`,
/// are added from each module's `depends=`).
pub const GUEST_MODULES: [&str; 4] = [
    "virtio_mmio",
    "virtio_blk",
    "vmw_vsock_virtio_transport",
    "virtio_net",
];

/// Modules added when the kernel has them as modules (when they are built in,
/// there is nothing to load): the ACPI power button and the input event
/// devices through which `reddog-guest` sees it being pressed.
pub const OPTIONAL_GUEST_MODULES: [&str; 2] = ["button", "evdev"];

/// Errors building the guest initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A kernel module could not be found or read, or the guest agent is not
    /// statically linked.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The archive could not be written.
    #[error("building the guest initramfs: {0}")]
    Cpio(#[from] CpioError),
    /// A file could not be read.
    #[error("reading {path}: {source}: pass the path of a statically linked reddog-guest")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Builds the guest initramfs for `kernel` with `guest_agent` (a statically
/// linked `reddog-guest`: the guest has no libraries) as `/init`. Returns the
/// archive and the module names in load order.
pub fn initramfs(
    kernel: &KernelArtifacts,
    guest_agent: &Path,
) -> Result<(Vec<u8>, Vec<String>), InitramfsError> {
    let init = std::fs::read(guest_agent).map_err(|source| InitramfsError::Read {
        path: guest_agent.display().to_string(),
        source,
    })?;
    artifacts::require_static(
        guest_agent,
        "build reddog-guest with RUSTFLAGS=\"-C target-feature=+crt-static\" \
         (cargo build --release -p guest-agent --target x86_64-unknown-linux-gnu)",
    )?;
    let mut modules = kernel.modules_with_deps(&GUEST_MODULES)?;
    for name in OPTIONAL_GUEST_MODULES {
        match kernel.modules_with_deps(&[name]) {
            Ok(extra) => {
                for m in extra {
                    if !modules.iter().any(|x| x.name == m.name) {
                        modules.push(m);
                    }
                }
            }
            Err(artifacts::ArtifactError::NoModule { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut w = CpioWriter::new(Vec::new());
    w.file("init", 0o755, &init)?;
    for d in ["dev", "proc", "sys", "tmp"] {
        w.dir(d, 0o755)?;
    }
    let mut list = String::new();
    for m in &modules {
        let path = format!("lib/modules/{}.ko", m.name);
        w.file(&path, 0o644, &m.bytes)?;
        list.push('/');
        list.push_str(&path);
        list.push('\n');
    }
    w.file("etc/reddog/modules", 0o644, list.as_bytes())?;
    Ok((w.finish()?, modules.into_iter().map(|m| m.name).collect()))
}
