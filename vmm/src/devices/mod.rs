//! Emulated devices and the [`Bus`] that routes guest port I/O and MMIO to them.
//!
//! Every access comes from the guest and is hostile: offsets and lengths are
//! checked, unknown ports read as all-ones and ignore writes, nothing panics.

pub mod boot_timer;
pub mod ged;
pub mod legacy;
pub mod mmio_manager;
pub mod rate_limiter;
pub mod serial;
pub mod virtio;

use std::sync::Mutex;

use vmm_api::{platform, ExitReason};

/// What a device access asks of the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusAction {
    /// Nothing further.
    Continue,
    /// Stop the VM for this reason.
    Stop(ExitReason, String),
}

/// The guest's buses: the fixed legacy devices on port I/O, and the
/// virtio-mmio devices.
pub struct Bus {
    serial: Mutex<serial::SerialDevice>,
    i8042: legacy::I8042,
    acpi: legacy::AcpiPm,
    boot_timer: boot_timer::BootTimer,
    ged: ged::Ged,
    mmio: mmio_manager::MmioDeviceManager,
}

impl Bus {
    /// A bus with these devices.
    pub fn new(
        serial: serial::SerialDevice,
        boot_timer: boot_timer::BootTimer,
        mmio: mmio_manager::MmioDeviceManager,
    ) -> Self {
        Self {
            serial: Mutex::new(serial),
            i8042: legacy::I8042,
            acpi: legacy::AcpiPm,
            boot_timer,
            ged: ged::Ged::new(),
            mmio,
        }
    }

    /// The boot timer (to read when the guest marked itself booted).
    pub fn boot_timer(&self) -> &boot_timer::BootTimer {
        &self.boot_timer
    }

    /// The ACPI Generic Event Device (power button).
    pub fn ged(&self) -> &ged::Ged {
        &self.ged
    }

    /// Flushes buffered console output (called when the VM stops).
    pub fn flush_console(&self) {
        if let Ok(mut s) = self.serial.lock() {
            s.flush();
        }
    }

    /// Guest `in` from `port`: fills `data` (1, 2 or 4 bytes).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        match port {
            p if (platform::SERIAL_PORT_BASE..platform::SERIAL_PORT_BASE + 8).contains(&p) => {
                if let Ok(mut s) = self.serial.lock() {
                    *first = s.read((p - platform::SERIAL_PORT_BASE) as u8);
                    data[1..].fill(0);
                }
            }
            platform::I8042_COMMAND_PORT | platform::I8042_DATA_PORT => {
                *first = self.i8042.read(port);
            }
            platform::ACPI_SLEEP_STATUS_PORT
            | platform::ACPI_SLEEP_CONTROL_PORT
            | platform::ACPI_RESET_PORT => *first = 0,
            platform::GED_STATUS_PORT => {
                *first = self.ged.read();
                data[1..].fill(0);
            }
            _ => {}
        }
    }

    /// Guest `out` of `data` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> BusAction {
        let Some(&value) = data.first() else {
            return BusAction::Continue;
        };
        match port {
            p if (platform::SERIAL_PORT_BASE..platform::SERIAL_PORT_BASE + 8).contains(&p) => {
                if let Ok(mut s) = self.serial.lock() {
                    s.write((p - platform::SERIAL_PORT_BASE) as u8, value);
                }
                BusAction::Continue
            }
            platform::BOOT_TIMER_PORT => {
                self.boot_timer.write(value);
                BusAction::Continue
            }
            platform::I8042_COMMAND_PORT | platform::I8042_DATA_PORT => {
                self.i8042.write(port, value)
            }
            platform::ACPI_SLEEP_CONTROL_PORT | platform::ACPI_RESET_PORT => {
                self.acpi.write(port, value)
            }
            _ => BusAction::Continue,
        }
    }

    /// Guest MMIO read; false when nothing is mapped there (the caller then
    /// returns all-ones).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.mmio.read(addr, data)
    }

    /// Guest MMIO write; false when nothing is mapped there.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.mmio.write(addr, data)
    }
}
