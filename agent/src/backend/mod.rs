//! The seams the agent drives, each a trait beside (not inside) its real
//! implementation; the fakes for tests are behind the `fake` cargo feature.
//!
//! | trait (file) | real implementation | fake (`fake.rs`) |
//! |---|---|---|
//! | [`VmmLauncher`] / [`VmmHandle`] (`vmm.rs`) | [`process::ProcessLauncher`]: `reddog-vmm` processes, with [`control::ControlConn`] on each control socket | `FakeLauncher` |
//! | [`DiskPreparer`] (`disks.rs`) | [`vhd_disks::VhdDiskPreparer`]: the `vhd` crate | `FakeDisks` |
//! | [`GuestChannel`] (`guest.rs`) | [`vsock_guest::VsockGuestChannel`]: `guest-proto` over hybrid vsock | `FakeGuests` |
//! | [`NetworkBackend`] (`net.rs`) | [`host_net::HostNetwork`]: TAPs (tun ioctl, `rtnetlink`), the agent's nftables table (`nft -j`) | `FakeNet` |

use std::sync::Arc;

pub mod control;
pub mod disks;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod guest;
pub mod host_net;
pub mod net;
pub mod process;
pub mod vhd_disks;
pub mod vmm;
pub mod vsock_guest;

pub use disks::DiskPreparer;
pub use guest::GuestChannel;
pub use net::NetworkBackend;
pub use vmm::{VmmHandle, VmmLauncher};

/// The four seams the agent drives.
#[derive(Clone)]
pub struct Backends {
    /// Starts VMMs.
    pub launcher: Arc<dyn VmmLauncher>,
    /// Makes disks.
    pub disks: Arc<dyn DiskPreparer>,
    /// Talks to guest agents.
    pub guests: Arc<dyn GuestChannel>,
    /// Makes TAPs and the agent's firewall rules (used only when the node
    /// has an instance subnet).
    pub net: Arc<dyn NetworkBackend>,
}
