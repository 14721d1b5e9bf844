//! The guest initramfs for real Linux guests ([`guest_image::initramfs`]),
//! with a statically linked `reddog-guest` built from this workspace.

use guest_image::KernelArtifacts;

pub use guest_image::initramfs::{InitramfsError, GUEST_MODULES};

/// The old name of [`InitramfsError`].
pub type GuestImageError = InitramfsError;

/// Builds the guest initramfs for `kernel` with a statically linked
/// `reddog-guest` from this workspace ([`crate::artifacts::static_bin`]).
/// Returns the archive and the module names in load order.
pub fn initramfs(kernel: &KernelArtifacts) -> Result<(Vec<u8>, Vec<String>), GuestImageError> {
    let agent = crate::artifacts::static_bin("guest-agent", "reddog-guest")?;
    guest_image::initramfs(kernel, &agent)
}
