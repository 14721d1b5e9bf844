//! Where reddog-vmm puts its virtio-mmio devices: a contract, because guests
//! and tests name a device by its window (the tiny test guest's `vsock=`, the
//! `virtio_mmio.device=` command line entries) and the VMM must keep to it.
//!
//! Device `i` (in attach order: one virtio-blk per configured disk, in the
//! config's order, then vsock, then one virtio-net per interface in the
//! config's order) gets the 4 KiB window at
//! `BASE + i * WINDOW_SIZE` and the interrupt line (GSI, edge triggered)
//! `FIRST_GSI + i`. The lines stop below the ACPI GED's
//! ([`super::GED_IRQ`]), so at most [`MAX_DEVICES`] devices fit.

/// Guest physical address of the first virtio-mmio window (inside the 3-4 GiB
/// hole below the IOAPIC and the LAPIC).
pub const BASE: u64 = 0xd000_0000;
/// Size of one device's window (the virtio-mmio register file and config space).
pub const WINDOW_SIZE: u64 = 0x1000;
/// Interrupt line of the first device (COM1 has [`super::SERIAL_IRQ`]).
pub const FIRST_GSI: u32 = 5;
/// Most virtio-mmio devices one VM can have: one line each, from [`FIRST_GSI`]
/// up to the one below the GED's.
pub const MAX_DEVICES: u32 = super::GED_IRQ - FIRST_GSI;
/// First address past the last window.
pub const END: u64 = BASE + MAX_DEVICES as u64 * WINDOW_SIZE;

// The lines sit above COM1's.
const _: () = assert!(FIRST_GSI > super::SERIAL_IRQ);

/// One device's place: its window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Guest physical address of the window ([`WINDOW_SIZE`] bytes).
    pub addr: u64,
    /// Its interrupt line (GSI).
    pub gsi: u32,
}

/// Device `index`'s window and interrupt; `None` past [`MAX_DEVICES`].
pub const fn window(index: u32) -> Option<Window> {
    if index >= MAX_DEVICES {
        return None;
    }
    Some(Window {
        addr: BASE + index as u64 * WINDOW_SIZE,
        gsi: FIRST_GSI + index,
    })
}

/// The vsock device's window in a VM with `disks` disks (disks come first);
/// `None` when that many devices do not fit.
pub const fn vsock_window(disks: u32) -> Option<Window> {
    window(disks)
}

/// The window of virtio-net device `index` in a VM with `disks` disks and
/// (when `vsock`) a vsock device: they come first. `None` when that many
/// devices do not fit.
pub const fn net_window(disks: u32, vsock: bool, index: u32) -> Option<Window> {
    let before = disks as u64 + vsock as u64 + index as u64;
    if before >= MAX_DEVICES as u64 {
        return None;
    }
    window(before as u32)
}

/// The index of the device whose window holds `addr`, if `addr` is in one.
pub const fn index_of(addr: u64) -> Option<u32> {
    if addr < BASE || addr >= END {
        return None;
    }
    Some(((addr - BASE) / WINDOW_SIZE) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The values are a contract with guests and tests: changing one moves
    // every device, so this pins them.
    #[test]
    fn the_layout_is_pinned() {
        assert_eq!(BASE, 0xd000_0000);
        assert_eq!(WINDOW_SIZE, 0x1000);
        assert_eq!(FIRST_GSI, 5);
        assert_eq!(MAX_DEVICES, 18);
        assert_eq!(END, 0xd001_2000);
        assert_eq!(
            window(0),
            Some(Window {
                addr: 0xd000_0000,
                gsi: 5
            })
        );
        assert_eq!(
            window(17),
            Some(Window {
                addr: 0xd001_1000,
                gsi: 22
            })
        );
        assert_eq!(window(18), None);
        assert_eq!(window(u32::MAX), None);
    }

    #[test]
    fn vsock_follows_the_disks() {
        assert_eq!(
            vsock_window(0),
            Some(Window {
                addr: 0xd000_0000,
                gsi: 5
            })
        );
        assert_eq!(
            vsock_window(3),
            Some(Window {
                addr: 0xd000_3000,
                gsi: 8
            })
        );
        assert_eq!(vsock_window(MAX_DEVICES), None);
    }

    #[test]
    fn net_follows_the_disks_and_vsock() {
        assert_eq!(net_window(0, false, 0).map(|w| w.addr), Some(0xd000_0000));
        assert_eq!(net_window(1, true, 0).map(|w| w.addr), Some(0xd000_2000));
        assert_eq!(net_window(1, true, 1).map(|w| w.gsi), Some(8));
        assert_eq!(net_window(MAX_DEVICES - 1, true, 0), None);
        assert_eq!(net_window(u32::MAX, true, u32::MAX), None);
    }

    #[test]
    fn addresses_map_back_to_their_device() {
        assert_eq!(index_of(BASE - 1), None);
        assert_eq!(index_of(BASE), Some(0));
        assert_eq!(index_of(0xd000_3fff), Some(3));
        assert_eq!(index_of(END - 1), Some(MAX_DEVICES - 1));
        assert_eq!(index_of(END), None);
        assert_eq!(index_of(u64::MAX), None);
        for i in 0..MAX_DEVICES {
            let w = window(i).expect("in range");
            assert_eq!(index_of(w.addr), Some(i));
            assert_eq!(index_of(w.addr + WINDOW_SIZE - 1), Some(i));
            assert!(w.gsi < crate::platform::GED_IRQ);
        }
    }

    #[test]
    fn the_last_line_is_the_one_below_the_ged() {
        let last = window(MAX_DEVICES - 1).expect("in range");
        assert_eq!(last.gsi + 1, crate::platform::GED_IRQ);
    }
}
