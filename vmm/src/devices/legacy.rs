//! The i8042 controller (only its reset line) and the ACPI hardware-reduced
//! sleep and reset registers.

use vmm_api::{platform, ExitReason};

use super::BusAction;

/// i8042: reads say "no data, buffers empty"; the reset command stops the VM.
pub struct I8042;

impl I8042 {
    /// A read of the status or data port.
    pub fn read(&self, _port: u16) -> u8 {
        0
    }

    /// A write: command 0xFE on the command port pulses the reset line.
    pub fn write(&self, port: u16, value: u8) -> BusAction {
        if port == platform::I8042_COMMAND_PORT && value == platform::I8042_RESET_CMD {
            BusAction::Stop(
                ExitReason::Reset,
                "i8042 reset (command 0xfe on port 0x64)".into(),
            )
        } else {
            BusAction::Continue
        }
    }
}

/// ACPI sleep control and reset registers (FADT, hardware reduced).
pub struct AcpiPm;

impl AcpiPm {
    /// A write to the sleep control or reset register.
    pub fn write(&self, port: u16, value: u8) -> BusAction {
        match port {
            platform::ACPI_SLEEP_CONTROL_PORT if value & platform::ACPI_SLP_EN != 0 => {
                let slp_typ = (value >> 2) & 0x7;
                if slp_typ == platform::ACPI_S5_SLP_TYP {
                    BusAction::Stop(ExitReason::PowerOff, "ACPI power-off (S5)".into())
                } else {
                    // Other sleep states are not offered by the DSDT; ignore.
                    BusAction::Continue
                }
            }
            platform::ACPI_RESET_PORT if value == platform::ACPI_RESET_VALUE => {
                BusAction::Stop(ExitReason::Reset, "ACPI reset register".into())
            }
            _ => BusAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_values_stop() {
        assert!(matches!(
            AcpiPm.write(
                platform::ACPI_SLEEP_CONTROL_PORT,
                platform::ACPI_POWER_OFF_VALUE
            ),
            BusAction::Stop(ExitReason::PowerOff, _)
        ));
        // SLP_EN without S5, or S5 without SLP_EN: nothing.
        assert_eq!(
            AcpiPm.write(platform::ACPI_SLEEP_CONTROL_PORT, 0x20 | (3 << 2)),
            BusAction::Continue
        );
        assert_eq!(
            AcpiPm.write(platform::ACPI_SLEEP_CONTROL_PORT, 5 << 2),
            BusAction::Continue
        );
        assert!(matches!(
            AcpiPm.write(platform::ACPI_RESET_PORT, 1),
            BusAction::Stop(ExitReason::Reset, _)
        ));
        assert_eq!(
            AcpiPm.write(platform::ACPI_RESET_PORT, 2),
            BusAction::Continue
        );
        assert!(matches!(
            I8042.write(0x64, 0xfe),
            BusAction::Stop(ExitReason::Reset, _)
        ));
        assert_eq!(I8042.write(0x60, 0xfe), BusAction::Continue);
        assert_eq!(I8042.write(0x64, 0xaa), BusAction::Continue);
    }
}
