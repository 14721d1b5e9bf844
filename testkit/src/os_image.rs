//! The guest's disks for agent-mode tests ([`guest_image::os_image`]), with
//! the statically linked `reddog-guest` built from this workspace.

use std::path::PathBuf;

pub use guest_image::os_image::{
    base_image_in, os_overlay, resource_disk, role_disk, web_role, worker_role, write_base_image,
    OsImageError, BASE_IMAGE_SIZE, LAYOUT_VERSION, ROLE_UID, ROLE_USER,
};

/// The cached OS base image with a statically linked `reddog-guest` from this
/// workspace ([`guest_image::os_image::base_image`]).
pub fn base_image() -> Result<PathBuf, OsImageError> {
    let agent = crate::artifacts::static_bin("guest-agent", "reddog-guest")?;
    guest_image::os_image::base_image(&agent)
}
