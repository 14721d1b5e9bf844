//! The virtio-mmio transport (virtio 1.x, register layout version 2).
//!
//! One 4 KiB window per device: registers below 0x100, the device's
//! configuration space from 0x100. Every access is the guest's and hostile:
//! register accesses must be 4 bytes and aligned, anything else is ignored.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueues, Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1};

/// Size of each device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the queue-notify register (where KVM ioeventfds are attached).
pub const QUEUE_NOTIFY: u64 = 0x050;
/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2 (virtio 1.x).
const VERSION: u32 = 2;
/// Our vendor ID ("RDOG" is not registered; virtio only requires a value).
const VENDOR_ID: u32 = 0x474f_4452;
const CONFIG_SPACE: u64 = 0x100;
/// Guest-caused warnings logged per device (then one line says the rest are
/// suppressed): a driver resetting and re-activating a broken device in a loop
/// must not flood the VMM's log.
pub const MAX_GUEST_WARNINGS: u32 = 10;

/// Which ring address register a write is for.
#[derive(Debug, Clone, Copy)]
enum Ring {
    Desc,
    Avail,
    Used,
}

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// One device behind its register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<Arc<EventFd>>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// Guest-caused warnings logged so far (see [`MAX_GUEST_WARNINGS`]).
    warnings: u32,
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue size the device asked for is not valid.
    #[error("virtio device asks for an invalid queue size: {0:?}")]
    QueueSize(virtio_queue::Error),
    /// An eventfd could not be created.
    #[error("cannot create a queue eventfd: {0}")]
    EventFd(std::io::Error),
}

impl MmioTransport {
    /// Wraps `device`; its interrupt goes through `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(MmioError::QueueSize)?);
            queue_events.push(Arc::new(
                EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd)?,
            ));
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            warnings: 0,
        })
    }

    /// The per-queue notify eventfds (to register as KVM ioeventfds, with the
    /// queue index as the data match).
    pub fn queue_events(&self) -> &[Arc<EventFd>] {
        &self.queue_events
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            0x044 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if !self.activated {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 if self.status & status::FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                // The non-logging setter: a bad size is the guest's to see (the
                // queue stays invalid and activation fails), not a log line.
                let bad = self
                    .selected_queue()
                    .is_some_and(|q| q.try_set_size(v.min(u32::from(u16::MAX)) as u16).is_err());
                if bad {
                    self.guest_warning(&format!("invalid queue size {v}"));
                }
            }
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => {
                // Without an ioeventfd the write exits here: signal the queue.
                if let Some(evt) = self.queue_events.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x064 => self.interrupt.ack(v),
            0x070 => self.write_status(v),
            0x080 => self.set_addr(Ring::Desc, false, v),
            0x084 => self.set_addr(Ring::Desc, true, v),
            0x090 => self.set_addr(Ring::Avail, false, v),
            0x094 => self.set_addr(Ring::Avail, true, v),
            0x0a0 => self.set_addr(Ring::Used, false, v),
            0x0a4 => self.set_addr(Ring::Used, true, v),
            _ => {}
        }
    }

    /// One half of a ring address, through virtio-queue's non-logging
    /// `try_set_*` setters (a misaligned address is refused and kept out).
    fn set_addr(&mut self, ring: Ring, high: bool, v: u32) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        let cur = match ring {
            Ring::Desc => q.desc_table(),
            Ring::Avail => q.avail_ring(),
            Ring::Used => q.used_ring(),
        };
        let addr = GuestAddress(if high {
            (cur & 0xffff_ffff) | (u64::from(v) << 32)
        } else {
            (cur & !0xffff_ffff) | u64::from(v)
        });
        let r = match ring {
            Ring::Desc => q.try_set_desc_table_address(addr),
            Ring::Avail => q.try_set_avail_ring_address(addr),
            Ring::Used => q.try_set_used_ring_address(addr),
        };
        if r.is_err() {
            self.guest_warning(&format!("misaligned {ring:?} ring address {:#x}", addr.0));
        }
    }

    /// Logs a guest-caused problem, at most [`MAX_GUEST_WARNINGS`] per device.
    fn guest_warning(&mut self, what: &str) {
        if self.warnings < MAX_GUEST_WARNINGS {
            self.warnings += 1;
            tracing::warn!(device_type = self.device.device_type(), "virtio: {what}");
        } else if self.warnings == MAX_GUEST_WARNINGS {
            self.warnings += 1;
            tracing::warn!(
                device_type = self.device.device_type(),
                "virtio: further guest-caused warnings of this device are suppressed"
            );
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.status = v & !status::FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if newly & status::DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & status::FEATURES_OK == 0 {
            self.fail("DRIVER_OK without FEATURES_OK");
            return;
        }
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                self.fail(&format!("queue {i} is not valid"));
                return;
            }
        }
        // The device gets its own copies; the transport keeps the registers.
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            match Queue::try_from(q.state()) {
                Ok(q) => queues.push(q),
                Err(_) => {
                    self.fail(&format!("queue {i} is not valid"));
                    return;
                }
            }
        }
        let active = ActiveQueues {
            mem: self.mem.clone(),
            queues,
            queue_events: self.queue_events.clone(),
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(self.driver_features, active) {
            Ok(()) => self.activated = true,
            Err(e) => self.fail(&e.to_string()),
        }
    }

    fn fail(&mut self, why: &str) {
        self.guest_warning(&format!("device not activated: {why}"));
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.trigger(INT_CONFIG);
    }

    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            tracing::warn!("virtio device could not be reset; it stays stopped");
        }
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    struct Dummy {
        activated: Arc<Mutex<Option<u64>>>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[0xaa, 0xbb], offset, data);
        }
        fn activate(
            &mut self,
            features: u64,
            _q: ActiveQueues,
        ) -> Result<(), super::super::ActivateError> {
            *self.activated.lock().expect("lock") = Some(features);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            *self.activated.lock().expect("lock") = None;
            true
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Option<u64>>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let activated = Arc::new(Mutex::new(None));
        let irq = Arc::new(Interrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        ));
        let t = MmioTransport::new(
            Box::new(Dummy {
                activated: activated.clone(),
            }),
            mem,
            irq,
        )
        .expect("transport");
        (t, activated)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, base: u32) {
        wr(t, 0x030, sel);
        wr(t, 0x038, 8);
        wr(t, 0x080, base);
        wr(t, 0x090, base + 0x1000);
        wr(t, 0x0a0, base + 0x2000);
        wr(t, 0x044, 1);
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 42);
        wr(&mut t, 0x014, 1);
        assert_eq!(rd(&mut t, 0x010), 1); // VERSION_1 is bit 32
        wr(&mut t, 0x030, 1);
        assert_eq!(rd(&mut t, 0x034), 8);
        wr(&mut t, 0x030, 7);
        assert_eq!(rd(&mut t, 0x034), 0);
        let mut b = [0u8; 2];
        t.read(0x100, &mut b);
        assert_eq!(b, [0xaa, 0xbb]);
        // Misaligned or short register accesses read zero and are ignored.
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0x070, &[1, 0]);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn negotiation_then_activation_then_reset() {
        let (mut t, activated) = transport();
        wr(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x024, 1);
        wr(&mut t, 0x020, 1); // VERSION_1
        wr(&mut t, 0x024, 0);
        wr(&mut t, 0x020, 1);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(rd(&mut t, 0x070) & status::FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(
            *activated.lock().expect("lock"),
            Some(VIRTIO_F_VERSION_1 | 1)
        );
        // Queue registers are frozen once active.
        wr(&mut t, 0x030, 0);
        wr(&mut t, 0x038, 4);
        wr(&mut t, 0x070, 0);
        assert_eq!(*activated.lock().expect("lock"), None);
        assert_eq!(rd(&mut t, 0x070), 0);
        assert_eq!(rd(&mut t, 0x044), 0);
    }

    #[test]
    fn features_the_device_does_not_offer_are_refused() {
        let (mut t, activated) = transport();
        wr(&mut t, 0x024, 0);
        wr(&mut t, 0x020, 1 | 2); // bit 1 is not offered
        wr(&mut t, 0x024, 1);
        wr(&mut t, 0x020, 1);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, 0x070) & status::FEATURES_OK, 0);
        // Legacy drivers (no VERSION_1) are refused too.
        let (mut t, _) = transport();
        wr(&mut t, 0x020, 1);
        wr(&mut t, 0x070, status::FEATURES_OK);
        assert_eq!(rd(&mut t, 0x070) & status::FEATURES_OK, 0);
        assert_eq!(*activated.lock().expect("lock"), None);
    }

    #[test]
    fn invalid_queues_do_not_activate() {
        let (mut t, activated) = transport();
        wr(&mut t, 0x024, 1);
        wr(&mut t, 0x020, 1);
        wr(&mut t, 0x070, status::FEATURES_OK);
        setup_queue(&mut t, 0, 0x10000);
        // Queue 1 points outside guest memory.
        setup_queue(&mut t, 1, 0xfff0_0000);
        wr(&mut t, 0x070, status::FEATURES_OK | status::DRIVER_OK);
        assert_eq!(*activated.lock().expect("lock"), None);
        assert_ne!(rd(&mut t, 0x070) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, 0x060) & INT_CONFIG, 0);
    }

    #[test]
    fn notify_without_ioeventfd_signals_the_queue() {
        let (mut t, _) = transport();
        wr(&mut t, QUEUE_NOTIFY, 1);
        wr(&mut t, QUEUE_NOTIFY, 9); // no such queue: ignored
        assert_eq!(t.queue_events()[1].read().expect("signalled"), 1);
        assert!(t.queue_events()[0].read().is_err());
    }
}
