//! virtio-blk over the `vhd` crate's [`vhd::DiskImage`].
//!
//! - `request.rs`: parse one descriptor chain into a request and execute it
//!   against the disk (pure queue logic, unit-tested with mock guest memory).
//! - `device.rs`: the device model (features, config space) and its I/O
//!   thread, which blocks on the queue's eventfd and serves requests.

mod device;
mod request;

pub use device::{BlockDevice, BlockError};
pub use request::{process_chain, RequestError, Target, MAX_REQUEST_BYTES, SERIAL_LEN};
