//! virtio-net over a host TAP device.
//!
//! - `tap.rs`: the TAP (opened by name through `/dev/net/tun`, or an inherited
//!   descriptor), with a 12-byte virtio-net header in front of every frame
//!   (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`) and the offloads the guest accepts
//!   (`TUNSETOFFLOAD`).
//! - `frame.rs`: one frame between a descriptor chain and a fixed buffer
//!   (pure queue logic: bounded chains, the MTU limit, offload checks).
//! - `device.rs`: the device model (features, config space with MAC, status
//!   and MTU) and its I/O thread: epoll on the TAP and the rx and tx queue
//!   eventfds; per-device counters for the control socket.
//!
//! The header is the same on the TAP and in the queues (virtio 1.x layout),
//! so a frame moves as one copy each way, with no header translation.

mod device;
mod frame;
mod tap;

pub use device::{drive_tx, NetCounters, NetDevice, NetError};
pub use frame::{
    check_frame, read_tx_chain, write_rx_chain, FrameError, Limits, ETH_HLEN, MAX_BUFFER,
    MAX_CHAIN_DESCRIPTORS, VNET_HDR_LEN,
};
pub use tap::{Tap, TapError};
