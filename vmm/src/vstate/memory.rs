//! Guest memory: anonymous, lazily backed mappings, one per RAM range.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::layout;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed.
    #[error("cannot map {mib} MiB of guest memory: {reason}; lower memory_mib or check the host's overcommit settings")]
    Mmap {
        /// Requested size.
        mib: u64,
        /// The mapping error.
        reason: String,
    },
}

/// Maps `bytes` of guest RAM (not touched: pages are faulted in by the guest).
pub fn create_guest_memory(bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(bytes)
        .into_iter()
        .map(|(base, size)| (GuestAddress(base), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Mmap {
        mib: bytes >> 20,
        reason: e.to_string(),
    })
}
