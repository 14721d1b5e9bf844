/*
 * A minimal virtio-net driver (virtio-mmio v2, split queues) that echoes:
 * each received frame is sent back from the same buffer with its Ethernet
 * source and destination swapped, then the buffer goes back to the receive
 * queue. No copies, no offloads (only VERSION_1, MAC and MTU are accepted).
 *
 * Buffer b (NBUF of them) is descriptor b in both queues: writable in rx,
 * read-only in tx, so no descriptor bookkeeping is needed.
 *
 * Waiting is `sti; hlt` until the device's interrupt. The device's GSI is not
 * derived from its address (QEMU's microvm places its windows and lines
 * differently from reddog-vmm): every IOAPIC pin from 5 up is routed to the
 * device vector, and each wake-up acknowledges the device's interrupt status.
 */
#include "guest.h"
#include "util.h"
#include "net.h"

#define NBUF 16
#define BUF_SIZE 2048
#define HDR_LEN 12 /* struct virtio_net_hdr_v1 */
#define ETH_HLEN 14

#define RXQ 0
#define TXQ 1

#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW 0x090
#define VIRTIO_MMIO_QUEUE_USED_LOW 0x0a0
#define VIRTIO_MMIO_CONFIG 0x100
#define VIRTIO_MAGIC_VALUE 0x74726976u
#define VIRTIO_ID_NET 1
#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define VRING_DESC_F_WRITE 2
#define VRING_USED_F_NO_NOTIFY 1
#define F_MTU (1u << 3)
#define F_MAC (1u << 5)

#define IOAPIC1 0xfec00000ull
#define IOAPIC2 0xfec10000ull /* QEMU microvm's second IOAPIC, when it has one */
#define IOAPIC_VERSION 0x01
#define IOAPIC_REDIR 0x10
#define FIRST_PIN 5
#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LVT_MASKED (1u << 16)
#define VEC_DEVICE 0x21
#define VEC_SPURIOUS 0x2f
#define IDT_ENTRIES 0x30

/* entry.S's handlers (shared with the vsock agent; only one of them runs). */
void agent_isr_device(void);
void agent_isr_spurious(void);
extern volatile u64 agent_lapic_eoi;
extern volatile u8 agent_irq;

struct vq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vring {
	struct vq_desc desc[NBUF];
	struct {
		u16 flags;
		u16 idx;
		u16 ring[NBUF];
		u16 used_event;
	} avail;
	struct {
		u16 flags;
		u16 idx;
		struct {
			u32 id;
			u32 len;
		} ring[NBUF];
		u16 avail_event;
	} used __attribute__((aligned(4)));
} __attribute__((aligned(16)));

struct idt_gate {
	u16 offset_low;
	u16 selector;
	u8 ist;
	u8 type;
	u16 offset_mid;
	u32 offset_high;
	u32 zero;
};

struct net_mem {
	u8 bufs[NBUF][BUF_SIZE];
	struct vring vrings[2];
	struct idt_gate idt[IDT_ENTRIES];
};
_Static_assert(sizeof(struct net_mem) <= NET_MEM_SIZE, "NET_MEM_SIZE is too small");

extern u8 net_mem[]; /* NET_MEM_SIZE bytes, 4 KiB aligned (linker script) */
#define MEM ((struct net_mem *)(void *)net_mem)

struct q {
	volatile struct vring *r;
	u16 size;
	u16 avail_idx;
	u16 used_idx;
	int kick; /* published entries the device has not been told about */
};

static u64 base;
static struct q qs[2];

static u32 mmio_rd(u32 off) { return rd32(base + off); }
static void mmio_wr(u32 off, u32 v) { wr32(base + off, v); }

int net_parse_option(struct net_options *o, const char *tok, u32 len)
{
	if (len > 4 && token_is(tok, 4, "net=")) {
		u64 v = 0;
		u32 i = 4;
		if (len > 6 && tok[4] == '0' && (tok[5] == 'x' || tok[5] == 'X'))
			i = 6;
		o->bad = i == len;
		for (; i < len; i++) {
			char c = tok[i];
			u32 d = c >= '0' && c <= '9' ? (u32)(c - '0')
				: c >= 'a' && c <= 'f' ? (u32)(c - 'a' + 10)
				: c >= 'A' && c <= 'F' ? (u32)(c - 'A' + 10) : 16;
			if (d > 15 || v > 0xfffffffull) {
				o->bad = 1;
				break;
			}
			v = v << 4 | d;
		}
		if (!o->bad && (v % 512 != 0 || !phys_ok(v, 512)))
			o->bad = 1;
		o->base = o->bad ? 0 : v;
		if (o->bad)
			o->base = 1; /* run, so that the error is reported */
		return 1;
	}
	if (token_is(tok, len, "net_oversize")) {
		o->oversize = 1;
		return 1;
	}
	return 0;
}

static void say_error(const char *what)
{
	put_str("net: error ");
	put_str(what);
	put_char('\n');
}

static void ioapic_route(u64 ioapic, u32 apic_id)
{
	wr32(ioapic, IOAPIC_VERSION);
	u32 version = rd32(ioapic + 0x10);
	if (version == 0xffffffffu || version == 0)
		return;
	u32 max = (version >> 16) & 0xff;
	for (u32 pin = (ioapic == IOAPIC1 ? FIRST_PIN : 0); pin <= max; pin++) {
		wr32(ioapic, IOAPIC_REDIR + 2 * pin + 1);
		wr32(ioapic + 0x10, apic_id << 24);
		wr32(ioapic, IOAPIC_REDIR + 2 * pin);
		wr32(ioapic + 0x10, VEC_DEVICE); /* edge, active high, unmasked */
	}
}

static void set_gate(u32 vector, void (*handler)(void))
{
	u64 off = (u64)(uintptr_t)handler;
	struct idt_gate *g = &MEM->idt[vector];
	g->offset_low = (u16)off;
	g->selector = GDT_CODE64;
	g->ist = 0;
	g->type = 0x8e;
	g->offset_mid = (u16)(off >> 16);
	g->offset_high = (u32)(off >> 32);
	g->zero = 0;
}

static const char *interrupts_init(void)
{
	u64 apic_base = rdmsr(MSR_APIC_BASE);
	if (!(apic_base & (1u << 11)))
		return "lapic-disabled";
	if (apic_base & (1u << 10))
		return "lapic-x2apic-mode";
	u64 lapic = apic_base & 0xfffff000ull;
	if (!phys_ok(lapic, 4096))
		return "lapic-address";
	agent_lapic_eoi = lapic + LAPIC_EOI;
	u64 *idt = (u64 *)(void *)MEM->idt;
	for (u32 i = 0; i < IDT_ENTRIES * 2; i++)
		idt[i] = 0;
	set_gate(VEC_DEVICE, agent_isr_device);
	set_gate(VEC_SPURIOUS, agent_isr_spurious);
	struct __attribute__((packed)) {
		u16 limit;
		u64 base;
	} idtr = { IDT_ENTRIES * sizeof(struct idt_gate) - 1, (u64)(uintptr_t)MEM->idt };
	__asm__ volatile("lidt %0" : : "m"(idtr));
	outb(PIC1_DATA, 0xff);
	outb(PIC2_DATA, 0xff);
	wr32(lapic + LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	wr32(lapic + LAPIC_TPR, 0);
	wr32(lapic + LAPIC_LVT_LINT0, LVT_MASKED);
	wr32(lapic + LAPIC_LVT_TIMER, LVT_MASKED);
	u32 apic_id = rd32(lapic + LAPIC_ID) >> 24;
	ioapic_route(IOAPIC1, apic_id);
	ioapic_route(IOAPIC2, apic_id);
	return 0;
}

static void publish(struct q *q, u16 desc)
{
	q->r->avail.ring[q->avail_idx & (q->size - 1)] = desc;
	barrier();
	q->avail_idx++;
	q->r->avail.idx = q->avail_idx;
	q->kick = 1;
}

static void kick(u32 n)
{
	struct q *q = &qs[n];
	if (!q->kick)
		return;
	q->kick = 0;
	barrier();
	if (!(q->r->used.flags & VRING_USED_F_NO_NOTIFY))
		mmio_wr(VIRTIO_MMIO_QUEUE_NOTIFY, n);
}

static int next_used(struct q *q, u32 *id, u32 *len)
{
	if (q->used_idx == q->r->used.idx)
		return 0;
	barrier();
	u32 slot = q->used_idx & (q->size - 1);
	*id = q->r->used.ring[slot].id;
	*len = q->r->used.ring[slot].len;
	q->used_idx++;
	return 1;
}

static const char *device_init(u32 *mtu, u8 mac[6])
{
	if (mmio_rd(VIRTIO_MMIO_MAGIC) != VIRTIO_MAGIC_VALUE)
		return "magic";
	if (mmio_rd(VIRTIO_MMIO_VERSION) != 2)
		return "version";
	u32 id = mmio_rd(VIRTIO_MMIO_DEVICE_ID);
	if (id != VIRTIO_ID_NET)
		return id == 0 ? "no-device" : "device-id";
	mmio_wr(VIRTIO_MMIO_STATUS, 0);
	u32 status = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
	mmio_wr(VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
	mmio_wr(VIRTIO_MMIO_STATUS, status);
	mmio_wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	u32 offered = mmio_rd(VIRTIO_MMIO_DEVICE_FEATURES) & (F_MTU | F_MAC);
	mmio_wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	if (!(mmio_rd(VIRTIO_MMIO_DEVICE_FEATURES) & 1))
		return "no-version-1";
	mmio_wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	mmio_wr(VIRTIO_MMIO_DRIVER_FEATURES, offered);
	mmio_wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	mmio_wr(VIRTIO_MMIO_DRIVER_FEATURES, 1);
	status |= STATUS_FEATURES_OK;
	mmio_wr(VIRTIO_MMIO_STATUS, status);
	if (!(mmio_rd(VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK))
		return "features";
	for (u32 i = 0; i < 6; i++)
		mac[i] = 0;
	if (offered & F_MAC) {
		u32 lo = mmio_rd(VIRTIO_MMIO_CONFIG), hi = mmio_rd(VIRTIO_MMIO_CONFIG + 4);
		for (u32 i = 0; i < 4; i++)
			mac[i] = (u8)(lo >> (8 * i));
		mac[4] = (u8)hi;
		mac[5] = (u8)(hi >> 8);
	}
	*mtu = 1500;
	if (offered & F_MTU)
		*mtu = mmio_rd(VIRTIO_MMIO_CONFIG + 8) >> 16; /* mtu is at offset 10 */

	for (u32 n = 0; n < 2; n++) {
		struct q *q = &qs[n];
		volatile struct vring *r = &MEM->vrings[n];
		mmio_wr(VIRTIO_MMIO_QUEUE_SEL, n);
		u32 max = mmio_rd(VIRTIO_MMIO_QUEUE_NUM_MAX);
		if (max == 0)
			return "queue-missing";
		u32 size = NBUF;
		while (size > max)
			size >>= 1;
		q->r = r;
		q->size = (u16)size;
		q->avail_idx = q->used_idx = 0;
		q->kick = 0;
		r->avail.flags = 0;
		r->avail.idx = 0;
		r->used.flags = 0;
		r->used.idx = 0;
		for (u32 b = 0; b < NBUF; b++) {
			r->desc[b].addr = (u64)(uintptr_t)MEM->bufs[b];
			r->desc[b].len = BUF_SIZE;
			r->desc[b].flags = n == RXQ ? VRING_DESC_F_WRITE : 0;
			r->desc[b].next = 0;
		}
		mmio_wr(VIRTIO_MMIO_QUEUE_NUM, size);
		u64 addrs[3] = { (u64)(uintptr_t)r->desc, (u64)(uintptr_t)&r->avail,
				 (u64)(uintptr_t)&r->used };
		for (u32 k = 0; k < 3; k++) {
			mmio_wr(VIRTIO_MMIO_QUEUE_DESC_LOW + 0x10 * k, (u32)addrs[k]);
			mmio_wr(VIRTIO_MMIO_QUEUE_DESC_LOW + 0x10 * k + 4, (u32)(addrs[k] >> 32));
		}
		mmio_wr(VIRTIO_MMIO_QUEUE_READY, 1);
	}
	status |= STATUS_DRIVER_OK;
	mmio_wr(VIRTIO_MMIO_STATUS, status);
	return 0;
}

static void put_mac(const u8 *m)
{
	for (u32 i = 0; i < 6; i++) {
		if (i)
			put_char(':');
		put_char("0123456789abcdef"[m[i] >> 4]);
		put_char("0123456789abcdef"[m[i] & 0xf]);
	}
}

static void wait_irq(void)
{
	__asm__ volatile("sti; hlt; cli" : : : "memory");
	if (agent_irq) {
		agent_irq = 0;
		mmio_wr(VIRTIO_MMIO_INTERRUPT_ACK, mmio_rd(VIRTIO_MMIO_INTERRUPT_STATUS));
	}
}

void net_main(const struct net_options *o)
{
	base = o->base;
	if (base == 1) {
		say_error("address");
		return;
	}
	__asm__ volatile("cli");
	const char *err = interrupts_init();
	if (err) {
		say_error(err);
		return;
	}
	u32 mtu = 0;
	u8 mac[6];
	err = device_init(&mtu, mac);
	if (err) {
		say_error(err);
		return;
	}
	struct q *rx = &qs[RXQ], *tx = &qs[TXQ];
	u32 nbuf = rx->size < tx->size ? rx->size : tx->size;
	if (o->oversize) {
		/* One frame one byte over the MTU, from the last buffer, before it is posted. */
		u32 len = HDR_LEN + ETH_HLEN + mtu + 1;
		if (len > BUF_SIZE)
			len = BUF_SIZE;
		volatile u8 *f = MEM->bufs[nbuf - 1];
		for (u32 i = 0; i < len; i++)
			f[i] = i < HDR_LEN ? 0 : (i < HDR_LEN + 6 ? 0xff : (u8)i);
		tx->r->desc[nbuf - 1].len = len;
		publish(tx, (u16)(nbuf - 1));
		kick(TXQ);
		u32 id, l;
		while (!next_used(tx, &id, &l))
			wait_irq();
	}
	for (u32 b = 0; b < nbuf; b++)
		publish(rx, (u16)b);
	kick(RXQ);
	put_str("net: echo base=");
	put_hex(base);
	put_str(" mac=");
	put_mac(mac);
	put_str(" mtu=");
	put_dec(mtu);
	put_str(" bufs=");
	put_dec(nbuf);
	put_str(" ready\n");

	for (;;) {
		u32 id, len, progress = 0;
		while (next_used(rx, &id, &len)) {
			progress = 1;
			if (id >= nbuf)
				continue; /* not ours: the device is broken; drop it */
			volatile u8 *f = MEM->bufs[id];
			if (len < HDR_LEN + ETH_HLEN || len > BUF_SIZE) {
				publish(rx, (u16)id);
				continue;
			}
			for (u32 i = 0; i < HDR_LEN; i++)
				f[i] = 0;
			for (u32 i = 0; i < 6; i++) {
				u8 t = f[HDR_LEN + i];
				f[HDR_LEN + i] = f[HDR_LEN + 6 + i];
				f[HDR_LEN + 6 + i] = t;
			}
			tx->r->desc[id].len = len;
			publish(tx, (u16)id);
		}
		kick(TXQ);
		while (next_used(tx, &id, &len)) {
			progress = 1;
			if (id < nbuf)
				publish(rx, (u16)id);
		}
		kick(RXQ);
		if (!progress)
			wait_irq();
	}
}
