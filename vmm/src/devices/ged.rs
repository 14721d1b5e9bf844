//! The ACPI Generic Event Device (GED): how a hardware-reduced platform tells the
//! guest about events such as the power button.
//!
//! The VMM sets a bit in the status register ([`vmm_api::platform::GED_STATUS_PORT`])
//! and pulses the GED's interrupt ([`vmm_api::platform::GED_IRQ`], an irqfd). The
//! guest's GED driver (Linux: `drivers/acpi/evged.c`) runs the DSDT's `_EVT`
//! method, which reads the register (reading clears it) and, for the power-button
//! bit, sends `Notify(\_SB.PWRB, 0x80)` to the `PNP0C0C` device; Linux's ACPI
//! button driver turns that into a `KEY_POWER` input event for userspace (PID 1)
//! to act on. See [`crate::acpi::dsdt`] for the AML.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use vmm_api::platform;
use vmm_sys_util::eventfd::EventFd;

/// The GED: a status byte and an interrupt line.
#[derive(Default)]
pub struct Ged {
    status: AtomicU8,
    irq: OnceLock<EventFd>,
}

impl Ged {
    /// A GED with no events pending and no interrupt yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects the interrupt (an eventfd registered with KVM as an irqfd on
    /// [`platform::GED_IRQ`]). Only the first call takes effect; false after that.
    pub fn connect_irq(&self, irq: EventFd) -> bool {
        self.irq.set(irq).is_ok()
    }

    /// A guest read of the status register: the pending events, which are cleared.
    pub fn read(&self) -> u8 {
        self.status.swap(0, Ordering::AcqRel)
    }

    /// Presses the power button: sets its status bit and interrupts the guest.
    pub fn press_power_button(&self) -> io::Result<()> {
        let irq = self.irq.get().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "the GED interrupt is not connected",
            )
        })?;
        self.status
            .fetch_or(platform::GED_EVENT_POWER_BUTTON, Ordering::AcqRel);
        irq.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_button_sets_the_bit_and_raises_the_interrupt() {
        let ged = Ged::new();
        assert!(
            ged.press_power_button().is_err(),
            "no interrupt: not pressed"
        );
        assert_eq!(ged.read(), 0);
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        assert!(ged.connect_irq(evt.try_clone().expect("clone")));
        assert!(!ged.connect_irq(evt.try_clone().expect("clone")));
        ged.press_power_button().expect("press");
        ged.press_power_button().expect("press again");
        assert_eq!(evt.read().expect("interrupt raised"), 2);
        // Two presses before the guest looked: one bit; reading clears it.
        assert_eq!(ged.read(), platform::GED_EVENT_POWER_BUTTON);
        assert_eq!(ged.read(), 0);
    }

    #[test]
    fn the_bus_routes_the_status_port() {
        let serial = crate::devices::serial::SerialDevice::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            Box::new(std::io::sink()),
        );
        let bus = crate::devices::Bus::new(
            serial,
            crate::devices::boot_timer::BootTimer::new(std::time::Instant::now()),
            Default::default(),
        );
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        bus.ged().connect_irq(evt.try_clone().expect("clone"));
        bus.ged().press_power_button().expect("press");
        let mut data = [0u8; 1];
        bus.pio_read(platform::GED_STATUS_PORT, &mut data);
        assert_eq!(data[0], platform::GED_EVENT_POWER_BUTTON);
        bus.pio_read(platform::GED_STATUS_PORT, &mut data);
        assert_eq!(data[0], 0, "reading cleared it");
        // Writes are ignored.
        bus.pio_write(platform::GED_STATUS_PORT, &[0xff]);
        bus.pio_read(platform::GED_STATUS_PORT, &mut data);
        assert_eq!(data[0], 0);
    }
}
