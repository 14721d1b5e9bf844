//! Virtio-mmio devices: allocates each a 4 KiB window and an interrupt, wires
//! its irqfd and queue ioeventfds into KVM, describes it for the DSDT, and
//! routes guest MMIO accesses to it.

use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::virtio::mmio::{MmioError, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use super::virtio::{Interrupt, VirtioDevice};
use crate::acpi::MmioDeviceInfo;
use crate::arch::layout;

/// First virtio-mmio window.
pub const MMIO_BASE: u64 = layout::MMIO_GAP_START + 0x1000_0000;
/// First interrupt line for virtio devices (COM1 has 4).
pub const FIRST_IRQ: u32 = 5;
/// Last interrupt line for virtio devices (the ACPI GED has the one above).
pub const LAST_IRQ: u32 = vmm_api::platform::GED_IRQ - 1;

/// Errors attaching a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// No interrupt lines left.
    #[error("too many virtio devices: at most {} fit the interrupt lines", LAST_IRQ - FIRST_IRQ + 1)]
    TooManyDevices,
    /// The transport could not be built.
    #[error(transparent)]
    Transport(#[from] MmioError),
    /// KVM refused an irqfd or ioeventfd.
    #[error("KVM refused the device's {what}: {source}")]
    Kvm {
        /// irqfd or ioeventfd.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be made.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// The virtio-mmio devices of a VM.
#[derive(Default)]
pub struct MmioDeviceManager {
    devices: Vec<(MmioDeviceInfo, Arc<Mutex<MmioTransport>>)>,
}

impl MmioDeviceManager {
    /// Attaches `device`: a window, an interrupt, irqfd and ioeventfds.
    pub fn attach(
        &mut self,
        vm: &kvm_ioctls::VmFd,
        mem: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
    ) -> Result<MmioDeviceInfo, DeviceManagerError> {
        let index = self.devices.len() as u32;
        let irq = FIRST_IRQ + index;
        if irq > LAST_IRQ {
            return Err(DeviceManagerError::TooManyDevices);
        }
        let base = MMIO_BASE + u64::from(index) * MMIO_WINDOW;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(|source| DeviceManagerError::Kvm {
                what: "irqfd",
                source,
            })?;
        let transport = MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(irqfd)))?;
        for (i, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), i as u32)
                .map_err(|source| DeviceManagerError::Kvm {
                    what: "ioeventfd",
                    source,
                })?;
        }
        let info = MmioDeviceInfo {
            base: base as u32,
            len: MMIO_WINDOW as u32,
            irq,
        };
        self.devices.push((info, Arc::new(Mutex::new(transport))));
        Ok(info)
    }

    /// What the DSDT must describe.
    pub fn infos(&self) -> Vec<MmioDeviceInfo> {
        self.devices.iter().map(|(i, _)| *i).collect()
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<MmioTransport>>)> {
        let index = addr.checked_sub(MMIO_BASE)? / MMIO_WINDOW;
        let (info, t) = self.devices.get(usize::try_from(index).ok()?)?;
        Some((addr - u64::from(info.base), t))
    }

    /// A guest MMIO read; false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, t)) => {
                if let Ok(mut t) = t.lock() {
                    t.read(offset, data);
                }
                true
            }
            None => false,
        }
    }

    /// A guest MMIO write; false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, t)) => {
                if let Ok(mut t) = t.lock() {
                    t.write(offset, data);
                }
                true
            }
            None => false,
        }
    }
}
