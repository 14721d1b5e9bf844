//! Virtio-mmio devices: gives each the window and interrupt line of its index
//! in the `vmm_api::platform::mmio` layout (the contract guests and tests rely
//! on), wires its irqfd and queue ioeventfds into KVM, describes it for the
//! DSDT, and routes guest MMIO accesses to it.

use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use vmm_api::platform::mmio;

use super::virtio::mmio::{MmioError, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use super::virtio::{Interrupt, VirtioDevice};
use crate::acpi::MmioDeviceInfo;
use crate::arch::layout;

// The windows sit in the MMIO hole, below the IOAPIC, and each holds one
// transport's register file.
const _: () = assert!(mmio::BASE >= layout::MMIO_GAP_START);
const _: () = assert!(mmio::END <= layout::IOAPIC_ADDR as u64);
const _: () = assert!(mmio::WINDOW_SIZE == MMIO_WINDOW);

/// Errors attaching a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// No interrupt lines left.
    #[error(
        "too many virtio devices: at most {} fit the interrupt lines; configure fewer disks",
        mmio::MAX_DEVICES
    )]
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
        let slot = u32::try_from(self.devices.len())
            .ok()
            .and_then(mmio::window)
            .ok_or(DeviceManagerError::TooManyDevices)?;
        let (base, irq) = (slot.addr, slot.gsi);
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
        let index = mmio::index_of(addr)?;
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
