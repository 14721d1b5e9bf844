//! ext4 (in progress).
