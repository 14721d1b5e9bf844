//! A guest cannot flood the VMM's log: a driver writing bad queue settings and
//! activating a broken device in a loop produces a bounded number of lines,
//! virtio-queue's own `log` records are dropped, and the log as a whole stops
//! at its byte cap. Runs the VMM's real logger (`vmm::logging::init`, as
//! `reddog-vmm` installs it) in its own test process.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::mmio::{status, MmioTransport, MAX_GUEST_WARNINGS};
use vmm::devices::virtio::{ActivateError, ActiveQueues, Interrupt, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Sink;
    fn make_writer(&'a self) -> Sink {
        self.clone()
    }
}

impl Sink {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

struct Dev;

impl VirtioDevice for Dev {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        1 << 32
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _features: u64, _queues: ActiveQueues) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) -> bool {
        true
    }
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

#[test]
fn guest_driven_queue_errors_and_floods_are_bounded() {
    let sink = Sink::default();
    let cap = vmm::logging::init(tracing::Level::WARN, sink.clone(), 1 << 20).expect("logger");

    // 1. A hostile driver, 10 000 rounds: bad queue sizes, misaligned ring
    //    addresses, DRIVER_OK on an invalid queue, reset.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
    let irq = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ));
    let mut t = MmioTransport::new(Box::new(Dev), mem.clone(), irq).expect("transport");
    for round in 0..10_000u32 {
        wr(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x024, 1);
        wr(&mut t, 0x020, 1);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        wr(&mut t, 0x030, 0);
        wr(&mut t, 0x038, 3 + round % 1000); // not a power of two, or too large
        wr(&mut t, 0x080, 0x1001); // misaligned
        wr(&mut t, 0x090, 0x2001);
        wr(&mut t, 0x0a0, 0x3002);
        wr(&mut t, 0x0a4, 0xffff_ffff); // far outside guest memory: activation fails
        wr(&mut t, 0x044, 1);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0, "round {round}");
        wr(&mut t, 0x070, 0);
    }
    let out = sink.text();
    let lines = out.lines().count();
    assert!(
        lines <= MAX_GUEST_WARNINGS as usize + 1,
        "{lines} lines for 10 000 bad rounds:\n{out}"
    );
    assert!(lines > 0, "the first problems are logged");
    assert!(out.contains("suppressed"), "{out}");

    // 2. virtio-queue's own records (its logging setters, its pop_descriptor_chain
    //    on a bogus available index) do not reach the log at all.
    let before = sink.text().len();
    let mut q = Queue::new(16).expect("queue");
    for _ in 0..1000 {
        q.set_size(7); // logs "virtio queue with invalid size" through `log`
        q.set_desc_table_address(Some(0x1001), None);
    }
    let mock = virtio_queue::mock::MockSplitQueue::new(&mem, 16);
    let mut q: Queue = mock.create_queue().expect("queue");
    mock.avail().idx().store(100);
    for _ in 0..1000 {
        assert!(q.pop_descriptor_chain(&mem).is_none());
    }
    assert_eq!(sink.text().len(), before, "{}", &sink.text()[before..]);

    // 3. The byte cap: past it, one line says so and nothing more is written.
    cap.set_max(cap.used() + 4096);
    for i in 0..10_000 {
        tracing::warn!("line {i} of a flood");
    }
    let out = sink.text();
    assert!(
        out.len() as u64 <= cap.used() + 200 && cap.used() <= before as u64 + 4096,
        "{} bytes, cap used {}",
        out.len(),
        cap.used()
    );
    assert_eq!(out.matches("reached its cap").count(), 1, "{out}");
}
