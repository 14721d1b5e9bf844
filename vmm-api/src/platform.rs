//! Guest-visible constants of the reddog machine. Guests (the tiny test guest,
//! `reddog-guest`) and the VMM both use these, so they live in one place.
//!
//! - [`mmio`]: the virtio-mmio windows and their interrupt lines.

pub mod mmio;

/// COM1, the 8250 serial console.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// COM1's legacy interrupt line.
pub const SERIAL_IRQ: u32 = 4;

/// Boot timer: the guest writes [`BOOT_TIMER_MAGIC`] as one byte to this I/O port
/// and the VMM records the microseconds since its `main` started.
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// The byte a guest writes to [`BOOT_TIMER_PORT`] to mark "booted".
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// i8042 command port: writing [`I8042_RESET_CMD`] here resets (ends) the VM.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 "pulse reset line" command.
pub const I8042_RESET_CMD: u8 = 0xfe;

/// ACPI hardware-reduced sleep control register (FADT `SLEEP_CONTROL_REG`), one byte.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI hardware-reduced sleep status register (FADT `SLEEP_STATUS_REG`), one byte.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (FADT `RESET_REG`), one byte.
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value to write to [`ACPI_RESET_PORT`] (FADT `RESET_VALUE`).
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// `SLP_EN` bit of the sleep control register.
pub const ACPI_SLP_EN: u8 = 1 << 5;
/// `SLP_TYP` value of S5 (soft off), as the DSDT's `_S5_` package says.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// The byte a guest writes to [`ACPI_SLEEP_CONTROL_PORT`] to power off.
pub const ACPI_POWER_OFF_VALUE: u8 = (ACPI_S5_SLP_TYP << 2) | ACPI_SLP_EN;

/// Guest physical address of the ACPI RSDP (inside the BIOS area Linux scans).
pub const RSDP_ADDR: u64 = 0x000e_0000;

/// ACPI Generic Event Device (GED, `ACPI0013`) status register, one byte: a read
/// returns the pending events ([`GED_EVENT_POWER_BUTTON`], ...) and clears them.
/// The DSDT's `_EVT` method reads it when the GED interrupt fires.
pub const GED_STATUS_PORT: u16 = 0x604;
/// Bit of [`GED_STATUS_PORT`]: the power button was pressed (`_EVT` then sends
/// `Notify(\_SB.PWRB, 0x80)` to the `PNP0C0C` power button device).
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
/// The GED's interrupt line (GSI, edge triggered, active high). Virtio-mmio
/// devices use the lines from 5 up to the one below it.
pub const GED_IRQ: u32 = 23;
