/*
 * The test guest's agent: a minimal virtio-vsock client (virtio-mmio v2, split
 * queues, polled rings) that connects to the host (CID 2) and speaks the
 * reddog guest protocol (docs/guest-protocol.md), encoded by hand.
 *
 * It runs only with `vsock=<mmio base>` on the command line; see ../README.md
 * for the options and the `agent: ...` console lines.
 *
 * Time: kvmclock (KVM's pvclock: nanoseconds since the VM was created, exact
 * and host-provided), or without it the TSC calibrated against the local APIC
 * timer, which KVM runs at 1 GHz (an initial count of 10^6 with divide-by-1 is
 * 1 ms). Waiting is always `sti; hlt` with a one-shot APIC timer armed for
 * the next deadline; the device's interrupt (IOAPIC pin = its GSI) ends the
 * wait early. Some hosts (kvm-pvm) emulate every guest instruction, so
 * nothing here spins.
 *
 * Everything lives in `agent_mem` (reserved by the linker script after the
 * stack, not zeroed at boot), so without `vsock=` the agent costs nothing.
 */
#include "guest.h"
#include "util.h"
#include "agent.h"

/* --- sizes and constants ---------------------------------------------------- */

#define QSIZE 16	   /* entries per virtqueue (fewer if the device allows fewer) */
#define RX_BUF_SIZE 4096   /* one rx buffer: packet header + payload */
#define TX_SLOT_SIZE 1024  /* one tx buffer: packet header + payload */
#define EV_BUF_SIZE 8	   /* struct virtio_vsock_event is 4 bytes */
#define TX_CONTROL_SLOTS 2 /* tx slots data never takes: RST, credit updates */
#define OBUF_SIZE 8192	   /* frames waiting for credit or tx slots (power of 2) */
#define RBUF_SIZE 8192	   /* one partial frame + one rx payload */
#define BUF_ALLOC 65536	   /* receive credit we give the host */

#define RXQ 0
#define TXQ 1
#define EVQ 2

/* guest-proto (docs/guest-protocol.md) */
#define PROTO_VERSION 1
#define PROTO_HEADER_LEN 8
#define PROTO_MAX_PAYLOAD 4088
#define PROTO_MIN_INTERVAL_MS 100
#define PROTO_MAX_INTERVAL_MS 60000
#define KIND_HELLO 0x01
#define KIND_HEARTBEAT 0x02
#define KIND_READY 0x05
#define KIND_PONG 0x07
#define KIND_HELLO_ACK 0x81
#define KIND_PING 0x82
#define KIND_SHUTDOWN 0x83
#define KIND_RESTART_ROLE 0x84
#define KIND_SET_HEARTBEAT_INTERVAL 0x85
#define CAP_HEARTBEAT_INTERVAL (1u << 2)
#define CAP_SHUTDOWN (1u << 3)
#define ROLE_RUNNING 2
#define ROLE_READY 3
#define AGENT_VERSION "test-guest/1"

/* virtio-mmio registers (version 2) */
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
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW 0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_USED_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100
#define VIRTIO_MAGIC_VALUE 0x74726976u /* "virt" */
#define VIRTIO_ID_VSOCK 19
#define VIRTIO_ID_BLOCK 2
#define VRING_DESC_F_NEXT 1
#define BLK_T_IN 0
#define BLK_MAX_KIB (QSIZE * RX_BUF_SIZE / 1024) /* the data buffer is the rx buffers */
#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define STATUS_NEEDS_RESET 64
#define STATUS_FAILED 128
#define INT_CONFIG 2
#define VRING_DESC_F_WRITE 2

/* virtio-vsock */
#define HOST_CID 2
#define VSOCK_TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define EVENT_TRANSPORT_RESET 0
#define FIRST_LOCAL_PORT 49152

/* Connection timing (ms). */
#define CONNECT_TIMEOUT_MS 2000
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define MAX_SLEEP_MS 1000

/* Local APIC (xAPIC MMIO), IOAPIC, legacy PIC. */
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LAPIC_DIVIDE_BY_1 0xb
#define LVT_MASKED (1u << 16)
#define APIC_TICKS_PER_MS 1000000u /* KVM's APIC bus: 1 GHz */
#define CALIBRATE_MS 5
#define CALIBRATE_RUNS 3
#define IOAPIC_ADDR 0xfec00000ull
#define IOAPIC_VERSION 0x01
#define IOAPIC_REDIR 0x10
#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1

/* Interrupt vectors; the IDT covers 0..IDT_ENTRIES-1, exceptions not present. */
#define VEC_TIMER 0x20
#define VEC_DEVICE 0x21
#define VEC_SPURIOUS 0x2f
#define IDT_ENTRIES 0x30

/* reddog-vmm's virtio-mmio layout (vmm_api::platform::mmio): build.rs passes
 * VMM_MMIO_BASE, VMM_MMIO_WINDOW, VMM_FIRST_GSI and VMM_MMIO_MAX_DEVICES from it. */
#if !defined(VMM_MMIO_BASE) || !defined(VMM_MMIO_WINDOW) || !defined(VMM_FIRST_GSI) || \
	!defined(VMM_MMIO_MAX_DEVICES)
#error "build.rs passes the virtio-mmio layout (VMM_MMIO_*, VMM_FIRST_GSI)"
#endif

/* --- shared with entry.S ------------------------------------------------------ */

void agent_isr_timer(void);
void agent_isr_device(void);
void agent_isr_spurious(void);
volatile u64 agent_lapic_eoi; /* EOI register address, for the ISRs */
volatile u8 agent_irq;	      /* set by the device's ISR */
extern u8 agent_mem[];	      /* AGENT_MEM_SIZE bytes, 4 KiB aligned (linker script) */

/* --- memory layout ------------------------------------------------------------ */

struct vq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vq_used_elem {
	u32 id;
	u32 len;
};

/* One split virtqueue: descriptor table, driver (avail) and device (used) rings. */
struct vring {
	struct vq_desc desc[QSIZE];
	struct {
		u16 flags;
		u16 idx;
		u16 ring[QSIZE];
		u16 used_event;
	} avail;
	struct {
		u16 flags;
		u16 idx;
		struct vq_used_elem ring[QSIZE];
		u16 avail_event;
	} used __attribute__((aligned(4)));
} __attribute__((aligned(16)));

struct __attribute__((packed)) vsock_hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
};
_Static_assert(sizeof(struct vsock_hdr) == 44, "virtio_vsock_hdr is 44 bytes");
#define HDR_LEN ((u32)sizeof(struct vsock_hdr))

struct idt_gate {
	u16 offset_low;
	u16 selector;
	u8 ist;
	u8 type;
	u16 offset_mid;
	u32 offset_high;
	u32 zero;
};

/* A virtqueue as the driver sees it. */
struct vq {
	volatile struct vring *r;
	u16 size;      /* entries in use (a power of 2, <= QSIZE) */
	u16 avail_idx; /* next avail index we publish */
	u16 used_idx;  /* next used index we read */
};

enum conn_state { CONN_IDLE, CONN_CONNECTING, CONN_CONNECTED };

struct agent {
	u64 base;   /* virtio-mmio window */
	u64 lapic;  /* xAPIC MMIO base */
	u64 cid;    /* our CID (config space) */
	u32 gsi;    /* the device's interrupt line */
	int kvmclock; /* time from kvmclock; else from the TSC calibrated here */
	u64 tsc_per_ms;
	struct vq q[3];
	u32 tx_free; /* bit i: tx slot i is free */

	/* The connection to (HOST_CID, port). */
	enum conn_state state;
	u32 port;
	u32 local_port;
	u64 deadline; /* CONNECTING: give up then; IDLE: connect then */
	u32 backoff_ms;
	u32 peer_buf_alloc, peer_fwd_cnt; /* the host's credit, as last told */
	u32 tx_cnt;			  /* payload bytes we sent */
	u32 fwd_cnt, fwd_cnt_told;	  /* payload bytes we consumed, and told */
	int credit_requested;
	u32 o_head, o_tail; /* obuf: bytes [tail, head) wait to be sent (free running) */
	u32 rlen;	    /* rbuf: bytes of partial frames */

	/* The guest protocol. */
	int acked;
	u32 interval_ms;
	u64 next_beat;
	u64 seq; /* heartbeats sent since boot */
	int ready_sent;
	u32 garbage_sent;
	u32 skipped_printed;
	u64 free_kib;
	u8 boot_id[16];
	enum hb_mode mode;
	u32 crash_after;
	int quiet; /* `quiet`: the exit line is not printed */
	u64 start_tsc;
};

/* kvmclock (pvclock_vcpu_time_info), written by KVM. */
struct pvclock {
	u32 version;
	u32 pad0;
	u64 tsc_timestamp;
	u64 system_time;
	u32 tsc_to_system_mul;
	int8_t tsc_shift;
	u8 flags;
	u8 pad[2];
} __attribute__((aligned(64)));

struct agent_mem {
	struct pvclock clock;
	u8 rx_bufs[QSIZE][RX_BUF_SIZE];
	u8 tx_bufs[QSIZE][TX_SLOT_SIZE];
	struct vring vrings[3];
	u8 ev_bufs[QSIZE][EV_BUF_SIZE];
	struct idt_gate idt[IDT_ENTRIES];
	u8 obuf[OBUF_SIZE];
	u8 rbuf[RBUF_SIZE];
	struct agent agent;
};
_Static_assert(sizeof(struct agent_mem) <= AGENT_MEM_SIZE, "AGENT_MEM_SIZE is too small");

#define MEM ((struct agent_mem *)(void *)agent_mem)

/* --- option parsing (called from main.c for every token) ----------------------- */

static const char *const mode_names[] = {
	[HB_NORMAL] = "normal", [HB_SILENT] = "silent", [HB_CRASH] = "crash",
	[HB_GARBAGE] = "garbage", [HB_FLOOD] = "flood",
};

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decimal, or hex with 0x; at most `max`. */
static int parse_num(const char *s, u32 len, u64 max, u64 *out)
{
	u32 i = 0, base = 10;
	if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	if (i == len)
		return 0;
	u64 v = 0;
	for (; i < len; i++) {
		int d = hex_digit(s[i]);
		if (d < 0 || (u32)d >= base || v > (max - (u32)d) / base)
			return 0;
		v = v * base + (u32)d;
	}
	*out = v;
	return 1;
}

/* `name=` at the start of the token, with something after it? */
static int has_prefix(const char *tok, u32 len, const char *name, u32 name_len)
{
	return len > name_len && token_is(tok, name_len, name);
}

int agent_parse_option(struct agent_options *o, const char *tok, u32 len)
{
	if (!o->seen) {
		o->seen = 1;
		o->enabled = 0;
		o->error = 0;
		o->vsock_base = 0;
		o->port = AGENT_DEFAULT_PORT;
		o->hb_ms = AGENT_DEFAULT_HB_MS;
		o->mode = HB_NORMAL;
		o->crash_after = AGENT_DEFAULT_CRASH_AFTER;
		o->have_boot_id = 0;
		o->tsc_clock = 0;
		o->blk_base = 0;
		o->blk_reads = AGENT_DEFAULT_BLK_READS;
		o->blk_kib = AGENT_DEFAULT_BLK_KIB;
	}
	u64 v = 0;
	const char *bad = 0;
	if (has_prefix(tok, len, "vsock=", 6)) {
		o->enabled = 1;
		if (parse_num(tok + 6, len - 6, 0xffffffffull, &v) && v % 4096 == 0 && phys_ok(v, 4096))
			o->vsock_base = v;
		else
			bad = "vsock";
	} else if (has_prefix(tok, len, "blk=", 4)) {
		o->enabled = 1;
		if (parse_num(tok + 4, len - 4, 0xffffffffull, &v) && v % 4096 == 0 && phys_ok(v, 4096))
			o->blk_base = v;
		else
			bad = "blk";
	} else if (has_prefix(tok, len, "blk_reads=", 10)) {
		if (parse_num(tok + 10, len - 10, 1000000, &v) && v != 0)
			o->blk_reads = (u32)v;
		else
			bad = "blk_reads";
	} else if (has_prefix(tok, len, "blk_kib=", 8)) {
		if (parse_num(tok + 8, len - 8, BLK_MAX_KIB, &v) && v != 0)
			o->blk_kib = (u32)v;
		else
			bad = "blk_kib";
	} else if (has_prefix(tok, len, "agent_port=", 11)) {
		if (parse_num(tok + 11, len - 11, 0xfffffffeull, &v) && v != 0)
			o->port = (u32)v;
		else
			bad = "agent_port";
	} else if (has_prefix(tok, len, "agent_clock=", 12)) {
		if (token_is(tok + 12, len - 12, "tsc"))
			o->tsc_clock = 1;
		else if (token_is(tok + 12, len - 12, "kvmclock"))
			o->tsc_clock = 0;
		else
			bad = "agent_clock";
	} else if (has_prefix(tok, len, "hb_ms=", 6)) {
		if (parse_num(tok + 6, len - 6, PROTO_MAX_INTERVAL_MS, &v) && v >= PROTO_MIN_INTERVAL_MS)
			o->hb_ms = (u32)v;
		else
			bad = "hb_ms";
	} else if (has_prefix(tok, len, "hb_mode=", 8)) {
		bad = "hb_mode";
		for (u32 m = 0; m < sizeof(mode_names) / sizeof(mode_names[0]); m++)
			if (token_is(tok + 8, len - 8, mode_names[m])) {
				o->mode = (enum hb_mode)m;
				bad = 0;
			}
	} else if (has_prefix(tok, len, "crash_after=", 12)) {
		if (parse_num(tok + 12, len - 12, 1000000, &v) && v != 0)
			o->crash_after = (u32)v;
		else
			bad = "crash_after";
	} else if (has_prefix(tok, len, "boot_id=", 8)) {
		bad = "boot_id";
		if (len - 8 == 32) {
			u32 i = 0;
			for (; i < 16; i++) {
				int hi = hex_digit(tok[8 + 2 * i]), lo = hex_digit(tok[9 + 2 * i]);
				if (hi < 0 || lo < 0)
					break;
				o->boot_id[i] = (u8)(hi << 4 | lo);
			}
			if (i == 16) {
				o->have_boot_id = 1;
				bad = 0;
			}
		}
	} else {
		return 0;
	}
	if (bad && !o->error)
		o->error = bad;
	return 1;
}

/* --- small helpers -------------------------------------------------------------- */

static void say(const char *s)
{
	put_str("agent: ");
	put_str(s);
}

static void say_line(const char *s)
{
	say(s);
	put_char('\n');
}

static void put_hex_bytes(const u8 *b, u32 n)
{
	for (u32 i = 0; i < n; i++) {
		put_char("0123456789abcdef"[b[i] >> 4]);
		put_char("0123456789abcdef"[b[i] & 0xf]);
	}
}

static void le16(u8 *p, u16 v)
{
	p[0] = (u8)v;
	p[1] = (u8)(v >> 8);
}

static void le32(u8 *p, u32 v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (u8)(v >> (8 * i));
}

static void le64(u8 *p, u64 v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (u8)(v >> (8 * i));
}

static u32 get32(const u8 *p)
{
	return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24;
}

static u64 get64(const u8 *p)
{
	return (u64)get32(p) | (u64)get32(p + 4) << 32;
}

static u64 splitmix64(u64 *state)
{
	u64 z = (*state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static u32 clamp_interval(u32 ms)
{
	if (ms < PROTO_MIN_INTERVAL_MS)
		return PROTO_MIN_INTERVAL_MS;
	if (ms > PROTO_MAX_INTERVAL_MS)
		return PROTO_MAX_INTERVAL_MS;
	return ms;
}

static u32 mmio_rd(const struct agent *a, u32 off) { return rd32(a->base + off); }
static void mmio_wr(const struct agent *a, u32 off, u32 v) { wr32(a->base + off, v); }
static u32 lapic_rd(const struct agent *a, u32 off) { return rd32(a->lapic + off); }
static void lapic_wr(const struct agent *a, u32 off, u32 v) { wr32(a->lapic + off, v); }

static void ioapic_wr(u32 reg, u32 v)
{
	wr32(IOAPIC_ADDR, reg);
	wr32(IOAPIC_ADDR + 0x10, v);
}

static u32 ioapic_rd(u32 reg)
{
	wr32(IOAPIC_ADDR, reg);
	return rd32(IOAPIC_ADDR + 0x10);
}

/* --- time ------------------------------------------------------------------------- */

/* kvmclock: nanoseconds since the VM was created. */
static u64 kvmclock_ns(void)
{
	volatile struct pvclock *c = &MEM->clock;
	u32 version;
	u64 tsc_timestamp, system_time, delta;
	u32 mul;
	int8_t shift;
	do {
		version = c->version;
		barrier();
		tsc_timestamp = c->tsc_timestamp;
		system_time = c->system_time;
		mul = c->tsc_to_system_mul;
		shift = c->tsc_shift;
		delta = rdtsc() - tsc_timestamp;
		barrier();
	} while ((version & 1) || version != c->version);
	if (shift < 0)
		delta >>= -shift;
	else
		delta <<= shift;
	return system_time + (u64)(((unsigned __int128)delta * mul) >> 32);
}

/*
 * Milliseconds since boot: kvmclock counts from the VM's creation; without
 * it, the calibrated TSC counts from the agent's start.
 */
static u64 now_ms(const struct agent *a)
{
	if (a->kvmclock)
		return kvmclock_ns() / 1000000;
	return (rdtsc() - a->start_tsc) / a->tsc_per_ms;
}

#define KVM_CPUID_SIGNATURE 0x40000000
#define KVM_CPUID_FEATURES 0x40000001
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01

/* Turns kvmclock on if KVM offers it (CPUID 0x40000001, MSR 0x4b564d01). */
static int kvmclock_init(void)
{
	u32 eax, ebx, ecx, edx;
	cpuid(1, &eax, &ebx, &ecx, &edx);
	if (!(ecx & (1u << 31)))
		return 0; /* no hypervisor */
	cpuid(KVM_CPUID_SIGNATURE, &eax, &ebx, &ecx, &edx);
	if (ebx != 0x4b4d564b || ecx != 0x564b4d56 || edx != 0x4d) /* "KVMKVMKVM\0\0\0" */
		return 0;
	if (eax < KVM_CPUID_FEATURES)
		return 0;
	cpuid(KVM_CPUID_FEATURES, &eax, &ebx, &ecx, &edx);
	if (!(eax & KVM_FEATURE_CLOCKSOURCE2))
		return 0;
	volatile struct pvclock *c = &MEM->clock;
	c->version = 0;
	c->tsc_to_system_mul = 0;
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)(uintptr_t)c | 1);
	barrier();
	/* KVM fills it in before the vCPU runs again; check that it did. */
	return c->version != 0 && !(c->version & 1) && c->tsc_to_system_mul != 0;
}

/* Sleeps until `deadline` (ms), at most MAX_SLEEP_MS, or until an interrupt. */
static void sleep_until(const struct agent *a, u64 deadline)
{
	u64 now = now_ms(a);
	if (deadline <= now)
		return;
	u64 ms = deadline - now;
	if (ms > MAX_SLEEP_MS)
		ms = MAX_SLEEP_MS;
	lapic_wr(a, LAPIC_TIMER_INIT, (u32)ms * APIC_TICKS_PER_MS);
	__asm__ volatile("sti; hlt; cli" : : : "memory");
}

static void set_gate(u32 vector, void (*handler)(void))
{
	u64 off = (u64)(uintptr_t)handler;
	struct idt_gate *g = &MEM->idt[vector];
	g->offset_low = (u16)off;
	g->selector = GDT_CODE64;
	g->ist = 0;
	g->type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
	g->offset_mid = (u16)(off >> 16);
	g->offset_high = (u32)(off >> 32);
	g->zero = 0;
}

/* IDT, LAPIC (timer one-shot), PIC masked; calibrates the TSC. */
static const char *interrupts_init(struct agent *a, int tsc_clock)
{
	u32 eax, ebx, ecx, edx;
	cpuid(1, &eax, &ebx, &ecx, &edx);
	if (!(edx & (1u << 9)))
		return "no-lapic";
	u64 apic_base = rdmsr(MSR_APIC_BASE);
	if (!(apic_base & (1u << 11)))
		return "lapic-disabled";
	if (apic_base & (1u << 10))
		return "lapic-x2apic-mode";
	a->lapic = apic_base & 0xfffff000ull;
	if (!phys_ok(a->lapic, 4096))
		return "lapic-address";
	agent_lapic_eoi = a->lapic + LAPIC_EOI;

	u64 *idt = (u64 *)(void *)MEM->idt;
	for (u32 i = 0; i < IDT_ENTRIES * 2; i++)
		idt[i] = 0; /* exceptions: not present, so a fault ends in a triple fault */
	set_gate(VEC_TIMER, agent_isr_timer);
	set_gate(VEC_DEVICE, agent_isr_device);
	set_gate(VEC_SPURIOUS, agent_isr_spurious);
	struct __attribute__((packed)) {
		u16 limit;
		u64 base;
	} idtr = { IDT_ENTRIES * sizeof(struct idt_gate) - 1, (u64)(uintptr_t)MEM->idt };
	__asm__ volatile("lidt %0" : : "m"(idtr));

	outb(PIC1_DATA, 0xff); /* the 8259s stay out of it */
	outb(PIC2_DATA, 0xff);
	lapic_wr(a, LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	lapic_wr(a, LAPIC_TPR, 0);
	lapic_wr(a, LAPIC_LVT_LINT0, LVT_MASKED);
	lapic_wr(a, LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_BY_1);
	lapic_wr(a, LAPIC_LVT_TIMER, VEC_TIMER); /* one-shot */

	a->kvmclock = !tsc_clock && kvmclock_init();
	if (a->kvmclock)
		return 0;
	a->start_tsc = rdtsc();
	/*
	 * No kvmclock: TSC ticks per ms against CALIBRATE_MS of the APIC timer.
	 * A late interrupt (vCPU descheduled) only makes a run longer: keep the
	 * shortest of a few.
	 */
	for (u32 run = 0; run < CALIBRATE_RUNS; run++) {
		u64 t0 = rdtsc();
		lapic_wr(a, LAPIC_TIMER_INIT, CALIBRATE_MS * APIC_TICKS_PER_MS);
		for (u32 i = 0; i < 100 && lapic_rd(a, LAPIC_TIMER_CURRENT) != 0; i++)
			__asm__ volatile("sti; hlt; cli" : : : "memory");
		u64 per_ms = (rdtsc() - t0) / CALIBRATE_MS;
		if (run == 0 || per_ms < a->tsc_per_ms)
			a->tsc_per_ms = per_ms;
	}
	if (a->tsc_per_ms == 0)
		return "clock";
	return 0;
}

/* Routes the device's GSI to VEC_DEVICE on this CPU: edge, active high. */
static const char *ioapic_init(const struct agent *a)
{
	u32 version = ioapic_rd(IOAPIC_VERSION);
	if (version == 0xffffffffu)
		return "no-ioapic";
	if (a->gsi > ((version >> 16) & 0xff))
		return "ioapic-pin";
	u32 apic_id = lapic_rd(a, LAPIC_ID) >> 24;
	ioapic_wr(IOAPIC_REDIR + 2 * a->gsi + 1, apic_id << 24);
	ioapic_wr(IOAPIC_REDIR + 2 * a->gsi, VEC_DEVICE);
	return 0;
}

/* --- virtqueues --------------------------------------------------------------------- */

static void vq_publish(struct vq *q, u16 desc)
{
	q->r->avail.ring[q->avail_idx & (q->size - 1)] = desc;
	barrier();
	q->avail_idx++;
	q->r->avail.idx = q->avail_idx;
}

static void vq_kick(const struct agent *a, u32 queue)
{
	barrier();
	mmio_wr(a, VIRTIO_MMIO_QUEUE_NOTIFY, queue);
}

/* The next used element, or 0 if the device has not used more. */
static int vq_next_used(struct vq *q, u32 *id, u32 *len)
{
	if (q->used_idx == q->r->used.idx)
		return 0;
	barrier();
	volatile struct vq_used_elem *e = &q->r->used.ring[q->used_idx & (q->size - 1)];
	*id = e->id;
	*len = e->len;
	q->used_idx++;
	return 1;
}

static void mmio_addr(const struct agent *a, u32 low_reg, const volatile void *p)
{
	u64 addr = (u64)(uintptr_t)p;
	mmio_wr(a, low_reg, (u32)addr);
	mmio_wr(a, low_reg + 4, (u32)(addr >> 32));
}

static u64 read_cid(const struct agent *a)
{
	u32 gen, lo, hi;
	for (u32 tries = 0; tries < 10; tries++) {
		gen = mmio_rd(a, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = mmio_rd(a, VIRTIO_MMIO_CONFIG);
		hi = mmio_rd(a, VIRTIO_MMIO_CONFIG + 4);
		if (gen == mmio_rd(a, VIRTIO_MMIO_CONFIG_GENERATION))
			break;
	}
	return (u64)hi << 32 | lo;
}

/* Resets and sets up the device (virtio 1.x, 3.1.1); posts rx and event buffers. */
static const char *virtio_init(struct agent *a)
{
	if (mmio_rd(a, VIRTIO_MMIO_MAGIC) != VIRTIO_MAGIC_VALUE)
		return "vsock-magic";
	if (mmio_rd(a, VIRTIO_MMIO_VERSION) != 2)
		return "vsock-version";
	u32 id = mmio_rd(a, VIRTIO_MMIO_DEVICE_ID);
	if (id != VIRTIO_ID_VSOCK)
		return id == 0 ? "vsock-no-device" : "vsock-device-id";

	mmio_wr(a, VIRTIO_MMIO_STATUS, 0);
	if (mmio_rd(a, VIRTIO_MMIO_STATUS) != 0)
		return "vsock-reset";
	u32 status = STATUS_ACKNOWLEDGE;
	mmio_wr(a, VIRTIO_MMIO_STATUS, status);
	status |= STATUS_DRIVER;
	mmio_wr(a, VIRTIO_MMIO_STATUS, status);

	mmio_wr(a, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	if (!(mmio_rd(a, VIRTIO_MMIO_DEVICE_FEATURES) & 1)) /* VIRTIO_F_VERSION_1 = bit 32 */
		return "vsock-no-version-1";
	mmio_wr(a, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	mmio_wr(a, VIRTIO_MMIO_DRIVER_FEATURES, 0);
	mmio_wr(a, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	mmio_wr(a, VIRTIO_MMIO_DRIVER_FEATURES, 1);
	status |= STATUS_FEATURES_OK;
	mmio_wr(a, VIRTIO_MMIO_STATUS, status);
	if (!(mmio_rd(a, VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK))
		return "vsock-features";

	for (u32 n = 0; n < 3; n++) {
		struct vq *q = &a->q[n];
		volatile struct vring *r = &MEM->vrings[n];
		mmio_wr(a, VIRTIO_MMIO_QUEUE_SEL, n);
		if (mmio_rd(a, VIRTIO_MMIO_QUEUE_READY) != 0)
			return "vsock-queue-ready";
		u32 max = mmio_rd(a, VIRTIO_MMIO_QUEUE_NUM_MAX);
		if (max == 0)
			return "vsock-queue-missing";
		u32 size = QSIZE;
		while (size > max)
			size >>= 1;
		q->r = r;
		q->size = (u16)size;
		q->avail_idx = 0;
		q->used_idx = 0;
		r->avail.flags = 0;
		r->avail.idx = 0;
		r->used.flags = 0;
		r->used.idx = 0;
		mmio_wr(a, VIRTIO_MMIO_QUEUE_NUM, size);
		mmio_addr(a, VIRTIO_MMIO_QUEUE_DESC_LOW, r->desc);
		mmio_addr(a, VIRTIO_MMIO_QUEUE_AVAIL_LOW, &r->avail);
		mmio_addr(a, VIRTIO_MMIO_QUEUE_USED_LOW, &r->used);
		mmio_wr(a, VIRTIO_MMIO_QUEUE_READY, 1);
	}
	a->cid = read_cid(a);

	/* rx: buffer i in descriptor i, all posted; event: the same, 8 bytes each. */
	for (u16 i = 0; i < a->q[RXQ].size; i++) {
		volatile struct vq_desc *d = &a->q[RXQ].r->desc[i];
		d->addr = (u64)(uintptr_t)MEM->rx_bufs[i];
		d->len = RX_BUF_SIZE;
		d->flags = VRING_DESC_F_WRITE;
		d->next = 0;
		vq_publish(&a->q[RXQ], i);
	}
	for (u16 i = 0; i < a->q[EVQ].size; i++) {
		volatile struct vq_desc *d = &a->q[EVQ].r->desc[i];
		d->addr = (u64)(uintptr_t)MEM->ev_bufs[i];
		d->len = EV_BUF_SIZE;
		d->flags = VRING_DESC_F_WRITE;
		d->next = 0;
		vq_publish(&a->q[EVQ], i);
	}
	a->tx_free = (1u << a->q[TXQ].size) - 1;

	status |= STATUS_DRIVER_OK;
	mmio_wr(a, VIRTIO_MMIO_STATUS, status);
	if (mmio_rd(a, VIRTIO_MMIO_STATUS) & STATUS_NEEDS_RESET)
		return "vsock-needs-reset";
	vq_kick(a, RXQ);
	vq_kick(a, EVQ);
	return 0;
}

/* --- vsock packets ----------------------------------------------------------------- */

static void tx_reclaim(struct agent *a)
{
	u32 id, len;
	while (vq_next_used(&a->q[TXQ], &id, &len))
		if (id < a->q[TXQ].size)
			a->tx_free |= 1u << id;
}

static u32 popcount(u32 v)
{
	u32 n = 0;
	for (; v; v &= v - 1)
		n++;
	return n;
}

/* A free tx slot, leaving `keep` slots free; -1 if none. */
static int tx_alloc(struct agent *a, u32 keep)
{
	if (popcount(a->tx_free) <= keep)
		tx_reclaim(a);
	if (popcount(a->tx_free) <= keep)
		return -1;
	int slot = __builtin_ctz(a->tx_free);
	a->tx_free &= ~(1u << slot);
	return slot;
}

/* Fills the header of tx slot `slot`; our credit goes with every packet. */
static void tx_header(struct agent *a, int slot, u16 op, u32 flags, u32 src_port, u32 dst_port, u32 len)
{
	struct vsock_hdr *h = (struct vsock_hdr *)(void *)MEM->tx_bufs[slot];
	h->src_cid = a->cid;
	h->dst_cid = HOST_CID;
	h->src_port = src_port;
	h->dst_port = dst_port;
	h->len = len;
	h->type = VSOCK_TYPE_STREAM;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = BUF_ALLOC;
	h->fwd_cnt = a->fwd_cnt;
	a->fwd_cnt_told = a->fwd_cnt;
}

static void tx_post(struct agent *a, int slot, u32 len)
{
	volatile struct vq_desc *d = &a->q[TXQ].r->desc[slot];
	d->addr = (u64)(uintptr_t)MEM->tx_bufs[slot];
	d->len = len;
	d->flags = 0;
	d->next = 0;
	vq_publish(&a->q[TXQ], (u16)slot);
}

/* A packet without payload; 0 if no tx slot is free. */
static int send_control(struct agent *a, u16 op, u32 src_port, u32 dst_port)
{
	int slot = tx_alloc(a, 0);
	if (slot < 0)
		return 0;
	tx_header(a, slot, op, 0, src_port, dst_port, 0);
	tx_post(a, slot, HDR_LEN);
	vq_kick(a, TXQ);
	return 1;
}

/* Sends what waits in obuf, within the host's credit. */
static void flush(struct agent *a)
{
	int posted = 0;
	while (a->state == CONN_CONNECTED && a->o_head != a->o_tail) {
		u32 in_flight = a->tx_cnt - a->peer_fwd_cnt;
		u32 credit = in_flight >= a->peer_buf_alloc ? 0 : a->peer_buf_alloc - in_flight;
		if (credit == 0) {
			if (!a->credit_requested)
				a->credit_requested = send_control(a, OP_CREDIT_REQUEST, a->local_port, a->port);
			break;
		}
		int slot = tx_alloc(a, TX_CONTROL_SLOTS);
		if (slot < 0)
			break;
		u32 n = a->o_head - a->o_tail;
		if (n > credit)
			n = credit;
		if (n > TX_SLOT_SIZE - HDR_LEN)
			n = TX_SLOT_SIZE - HDR_LEN;
		u8 *p = MEM->tx_bufs[slot] + HDR_LEN;
		for (u32 i = 0; i < n; i++)
			p[i] = MEM->obuf[(a->o_tail + i) & (OBUF_SIZE - 1)];
		tx_header(a, slot, OP_RW, 0, a->local_port, a->port, n);
		tx_post(a, slot, HDR_LEN + n);
		a->o_tail += n;
		a->tx_cnt += n;
		posted = 1;
	}
	if (posted)
		vq_kick(a, TXQ);
}

/* --- guest protocol frames ------------------------------------------------------------ */

static u32 obuf_free(const struct agent *a)
{
	return OBUF_SIZE - (a->o_head - a->o_tail);
}

static void obuf_put(struct agent *a, const u8 *p, u32 n)
{
	for (u32 i = 0; i < n; i++)
		MEM->obuf[(a->o_head++) & (OBUF_SIZE - 1)] = p[i];
}

/* Queues a frame; 0 if it does not fit (it is not queued then). */
static int out_frame(struct agent *a, u8 kind, const u8 *payload, u32 len)
{
	if (obuf_free(a) < PROTO_HEADER_LEN + len)
		return 0;
	u8 h[PROTO_HEADER_LEN] = { 'R', 'D', PROTO_VERSION, kind, 0, 0, 0, 0 };
	le16(h + 4, (u16)len);
	obuf_put(a, h, PROTO_HEADER_LEN);
	obuf_put(a, payload, len);
	return 1;
}

static void send_hello(struct agent *a)
{
	static const char version[] = AGENT_VERSION;
	u8 p[27 + sizeof(version) - 1];
	p[0] = PROTO_VERSION; /* min_version */
	p[1] = PROTO_VERSION; /* max_version */
	for (u32 i = 0; i < 16; i++)
		p[2 + i] = a->boot_id[i];
	le64(p + 18, CAP_HEARTBEAT_INTERVAL | CAP_SHUTDOWN);
	p[26] = sizeof(version) - 1;
	for (u32 i = 0; i < sizeof(version) - 1; i++)
		p[27 + i] = (u8)version[i];
	out_frame(a, KIND_HELLO, p, sizeof(p));
}

/* Queues the next heartbeat (and Ready after the first); 0 if there is no room. */
static int send_heartbeat(struct agent *a, u64 now)
{
	u8 p[41];
	if (obuf_free(a) < 2 * PROTO_HEADER_LEN + sizeof(p))
		return 0;
	le64(p, a->seq);
	le64(p + 8, now);
	le32(p + 16, 0); /* load averages */
	le32(p + 20, 0);
	le32(p + 24, 0);
	le64(p + 28, a->free_kib);
	p[36] = a->ready_sent ? ROLE_READY : ROLE_RUNNING;
	le32(p + 37, 0); /* role restarts */
	out_frame(a, KIND_HEARTBEAT, p, sizeof(p));
	u64 every = a->mode == HB_FLOOD ? 1000 : 10;
	if (a->seq < 3 || a->seq % every == 0) {
		say("heartbeat seq=");
		put_dec(a->seq);
		put_char('\n');
	}
	a->seq++;
	if (!a->ready_sent) {
		out_frame(a, KIND_READY, 0, 0);
		a->ready_sent = 1;
		say_line("ready");
	}
	return 1;
}

/* Bytes that are not frames: a bad magic, then an oversized payload length. */
static void send_garbage(struct agent *a)
{
	static const u8 bad_magic[8] = { 'B', 'A', 'D', '!', 1, 2, 0, 0 };
	static const u8 too_long[8] = { 'R', 'D', PROTO_VERSION, KIND_HEARTBEAT, 0xff, 0xff, 0, 0 };
	if (obuf_free(a) < 8)
		return;
	obuf_put(a, a->garbage_sent % 2 ? too_long : bad_magic, 8);
	if (a->garbage_sent < 3 || a->garbage_sent % 10 == 0) {
		say("garbage n=");
		put_dec(a->garbage_sent);
		put_char('\n');
	}
	a->garbage_sent++;
}

/* --- the connection ----------------------------------------------------------------------- */

/* Drops the connection (with an RST if it was open) and retries after the backoff. */
static void conn_drop(struct agent *a, int send_rst, u64 now)
{
	if (send_rst && a->state != CONN_IDLE)
		send_control(a, OP_RST, a->local_port, a->port);
	a->state = CONN_IDLE;
	a->deadline = now + a->backoff_ms;
	a->backoff_ms = a->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : a->backoff_ms * 2;
	a->o_head = a->o_tail = 0;
	a->rlen = 0;
	a->acked = 0;
}

static void conn_start(struct agent *a, u64 now)
{
	a->local_port++;
	a->tx_cnt = 0;
	a->fwd_cnt = 0;
	a->fwd_cnt_told = 0;
	a->peer_buf_alloc = 0;
	a->peer_fwd_cnt = 0;
	a->credit_requested = 0;
	a->o_head = a->o_tail = 0;
	a->rlen = 0;
	a->acked = 0;
	if (!send_control(a, OP_REQUEST, a->local_port, a->port)) {
		a->deadline = now + 10; /* no tx slot: try again soon */
		return;
	}
	a->state = CONN_CONNECTING;
	a->deadline = now + CONNECT_TIMEOUT_MS;
}

static void conn_established(struct agent *a, u64 now)
{
	a->state = CONN_CONNECTED;
	a->backoff_ms = BACKOFF_MIN_MS;
	say("connected port=");
	put_dec(a->port);
	put_char('\n');
	send_hello(a);
	/* Garbage starts one interval after Hello; heartbeats after HelloAck. */
	a->next_beat = now + a->interval_ms;
}

static void frame_error(const char *what, u8 kind)
{
	say("error ");
	put_str(what);
	put_str(" kind=");
	put_hex(kind);
	put_char('\n');
}

/* One frame from the host, with a sound header. */
static void handle_frame(struct agent *a, u8 version, u8 kind, u16 reserved, const u8 *p, u32 len, u64 now)
{
	u32 need;
	switch (kind) {
	case KIND_HELLO_ACK:
		need = 5;
		break;
	case KIND_PING:
		need = 8;
		break;
	case KIND_SHUTDOWN:
	case KIND_SET_HEARTBEAT_INTERVAL:
		need = 4;
		break;
	case KIND_RESTART_ROLE:
		need = 0;
		break;
	default:
		if (kind <= 0x80) {
			frame_error("bad-frame direction", kind);
		} else if (a->skipped_printed < 10) {
			/* A newer host's kind: skip it (its length is in the header). */
			a->skipped_printed++;
			say("skipped kind=");
			put_hex(kind);
			put_char('\n');
		}
		return;
	}
	/* Our version: exactly our layout. A newer one may append fields. */
	if (len < need || (version <= PROTO_VERSION && (len != need || reserved != 0))) {
		frame_error("bad-frame length", kind);
		return;
	}
	int obey = a->mode != HB_SILENT;
	switch (kind) {
	case KIND_HELLO_ACK: {
		u32 interval = get32(p + 1);
		say("hello-ack version=");
		put_dec(p[0]);
		put_str(" interval=");
		put_dec(interval);
		put_char('\n');
		if (p[0] != PROTO_VERSION) {
			say_line(p[0] == 0 ? "error rejected" : "error version");
			conn_drop(a, 1, now);
			return;
		}
		a->acked = 1;
		a->interval_ms = clamp_interval(interval);
		if (a->mode != HB_GARBAGE)
			a->next_beat = now; /* the first heartbeat right away */
		else if (a->next_beat > now + a->interval_ms)
			a->next_beat = now + a->interval_ms;
		break;
	}
	case KIND_PING: {
		u64 nonce = get64(p);
		say("ping nonce=");
		put_dec(nonce);
		put_char('\n');
		u8 pong[8];
		le64(pong, nonce);
		if (obey && !out_frame(a, KIND_PONG, pong, 8))
			say_line("error pong-dropped");
		break;
	}
	case KIND_SHUTDOWN:
		if (!obey) {
			say_line("shutdown ignored");
			break;
		}
		say_line("shutdown");
		agent_power_off(a->quiet);
	case KIND_SET_HEARTBEAT_INTERVAL: {
		u32 interval = clamp_interval(get32(p));
		say("interval ms=");
		put_dec(interval);
		put_char('\n');
		a->interval_ms = interval;
		a->next_beat = now + interval;
		break;
	}
	case KIND_RESTART_ROLE:
		frame_error("unexpected", kind); /* we announced no role */
		break;
	}
}

/* Decodes the complete frames in rbuf. */
static void parse_frames(struct agent *a, u64 now)
{
	u8 *b = MEM->rbuf;
	u32 off = 0;
	while (a->rlen - off >= PROTO_HEADER_LEN) {
		u8 *f = b + off;
		u32 len = (u32)f[4] | (u32)f[5] << 8;
		if (f[0] != 'R' || f[1] != 'D' || f[2] == 0 || len > PROTO_MAX_PAYLOAD) {
			/* Framing error on a reliable stream: the host is broken; start over. */
			say_line("error framing");
			conn_drop(a, 1, now);
			return;
		}
		if (a->rlen - off < PROTO_HEADER_LEN + len)
			break;
		handle_frame(a, f[2], f[3], (u16)(f[6] | f[7] << 8), f + PROTO_HEADER_LEN, len, now);
		if (a->state != CONN_CONNECTED)
			return;
		off += PROTO_HEADER_LEN + len;
	}
	for (u32 i = off; i < a->rlen; i++)
		b[i - off] = b[i];
	a->rlen -= off;
}

/* One packet the device put in an rx buffer (`used` bytes written). */
static void rx_packet(struct agent *a, const u8 *buf, u32 used, u64 now)
{
	if (used < HDR_LEN)
		return;
	struct vsock_hdr h;
	memcpy(&h, buf, HDR_LEN);
	int ours = a->state != CONN_IDLE && h.src_cid == HOST_CID && h.src_port == a->port &&
		   h.dst_port == a->local_port && h.type == VSOCK_TYPE_STREAM;
	if (!ours) {
		/* Not our connection (a host CONNECT to us, or a stale one): refuse. */
		if (h.op != OP_RST)
			send_control(a, OP_RST, h.dst_port, h.src_port);
		return;
	}
	a->peer_buf_alloc = h.buf_alloc;
	a->peer_fwd_cnt = h.fwd_cnt;
	a->credit_requested = 0;
	switch (h.op) {
	case OP_RESPONSE:
		if (a->state == CONN_CONNECTING)
			conn_established(a, now);
		else
			conn_drop(a, 1, now);
		break;
	case OP_RST:
		if (a->state == CONN_CONNECTING) {
			say("refused port=");
			put_dec(a->port);
			put_str(" retry_ms=");
			put_dec(a->backoff_ms);
			put_char('\n');
		} else {
			say_line("reset by host op=rst");
		}
		conn_drop(a, 0, now);
		break;
	case OP_SHUTDOWN:
		/* The host closed (or half-closed) the stream: we start over. */
		say_line("reset by host op=shutdown");
		conn_drop(a, 1, now);
		break;
	case OP_RW: {
		if (a->state != CONN_CONNECTED) {
			conn_drop(a, 1, now);
			break;
		}
		u32 n = h.len;
		if (n > used - HDR_LEN)
			n = used - HDR_LEN;
		if (n > RBUF_SIZE - a->rlen) {
			say_line("error rx-overflow");
			conn_drop(a, 1, now);
			break;
		}
		memcpy(MEM->rbuf + a->rlen, buf + HDR_LEN, n);
		a->rlen += n;
		a->fwd_cnt += n;
		parse_frames(a, now);
		if (a->state == CONN_CONNECTED && a->fwd_cnt - a->fwd_cnt_told >= BUF_ALLOC / 2)
			send_control(a, OP_CREDIT_UPDATE, a->local_port, a->port);
		break;
	}
	case OP_CREDIT_UPDATE:
		break; /* the new credit is taken above; flush() uses it */
	case OP_CREDIT_REQUEST:
		send_control(a, OP_CREDIT_UPDATE, a->local_port, a->port);
		break;
	default: /* REQUEST on a connection, or an unknown op */
		conn_drop(a, 1, now);
		break;
	}
}

/* Takes what the device used from the three queues; 1 if there was anything. */
static int poll_device(struct agent *a)
{
	int work = 0;
	if (agent_irq) {
		agent_irq = 0;
		u32 s = mmio_rd(a, VIRTIO_MMIO_INTERRUPT_STATUS);
		if (s)
			mmio_wr(a, VIRTIO_MMIO_INTERRUPT_ACK, s);
		if ((s & INT_CONFIG) && (mmio_rd(a, VIRTIO_MMIO_STATUS) & STATUS_NEEDS_RESET)) {
			say_line("error vsock-needs-reset");
			return -1;
		}
	}
	u32 used_before = a->q[TXQ].used_idx;
	tx_reclaim(a);
	if (a->q[TXQ].used_idx != used_before)
		work = 1;

	u32 id, len;
	int reposted = 0;
	struct vq *rx = &a->q[RXQ];
	while (vq_next_used(rx, &id, &len)) {
		if (id >= rx->size)
			continue;
		if (len > RX_BUF_SIZE)
			len = RX_BUF_SIZE;
		rx_packet(a, MEM->rx_bufs[id], len, now_ms(a));
		vq_publish(rx, (u16)id);
		reposted = 1;
	}
	if (reposted) {
		vq_kick(a, RXQ);
		work = 1;
	}

	reposted = 0;
	struct vq *ev = &a->q[EVQ];
	while (vq_next_used(ev, &id, &len)) {
		if (id >= ev->size)
			continue;
		if (len >= 4 && get32(MEM->ev_bufs[id]) == EVENT_TRANSPORT_RESET) {
			/* Every connection is gone (e.g. after a migration); the CID may differ. */
			say_line("transport reset");
			a->cid = read_cid(a);
			if (a->state != CONN_IDLE)
				conn_drop(a, 0, now_ms(a));
		}
		vq_publish(ev, (u16)id);
		reposted = 1;
	}
	if (reposted) {
		vq_kick(a, EVQ);
		work = 1;
	}
	return work;
}

/* Does what is due at `now`; returns when to come back (ms). */
static u64 step(struct agent *a, u64 now)
{
	if (a->state == CONN_IDLE && now >= a->deadline)
		conn_start(a, now);
	if (a->state == CONN_CONNECTING && now >= a->deadline) {
		say_line("error connect-timeout");
		conn_drop(a, 1, now);
	}
	if (a->state != CONN_CONNECTED)
		return a->deadline;

	u64 next = now + MAX_SLEEP_MS;
	switch (a->mode) {
	case HB_NORMAL:
	case HB_CRASH:
		if (!a->acked)
			break;
		if (a->mode == HB_CRASH && a->seq >= a->crash_after) {
			/* Crash once the last heartbeat left: nothing queued, all slots back. */
			tx_reclaim(a);
			if (a->o_head == a->o_tail && a->tx_free == (1u << a->q[TXQ].size) - 1) {
				say("crash after ");
				put_dec(a->seq);
				put_str(" heartbeats\n");
				agent_triple_fault(a->quiet);
			}
			break;
		}
		if (now >= a->next_beat && send_heartbeat(a, now)) {
			a->next_beat += a->interval_ms;
			if (a->next_beat <= now)
				a->next_beat = now + a->interval_ms;
		}
		next = a->next_beat;
		break;
	case HB_GARBAGE:
		if (now >= a->next_beat) {
			send_garbage(a);
			a->next_beat = now + a->interval_ms;
		}
		next = a->next_beat;
		break;
	case HB_FLOOD:
		if (!a->acked)
			break;
		for (u32 i = 0; i < 64; i++)
			if (!send_heartbeat(a, now))
				break;
		break;
	case HB_SILENT:
		break;
	}
	flush(a);
	/* Flood: come back at once while there is room; interrupts say when there is. */
	if (a->mode == HB_FLOOD && a->acked && obuf_free(a) >= 2 * PROTO_HEADER_LEN + 41)
		next = now;
	return next;
}

/* --- virtio-blk timing (`blk=`) ---------------------------------------------------------- */

static void fail(const char *what);

/*
 * Sets up the virtio-blk device at a->base: VERSION_1 only, queue 0 with at
 * most QSIZE entries. Returns the capacity in sectors through *sectors.
 */
static const char *blk_virtio_init(struct agent *a, u64 *sectors)
{
	if (mmio_rd(a, VIRTIO_MMIO_MAGIC) != VIRTIO_MAGIC_VALUE)
		return "blk-magic";
	if (mmio_rd(a, VIRTIO_MMIO_VERSION) != 2)
		return "blk-version";
	if (mmio_rd(a, VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_BLOCK)
		return "blk-device-id";
	mmio_wr(a, VIRTIO_MMIO_STATUS, 0);
	u32 status = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
	mmio_wr(a, VIRTIO_MMIO_STATUS, status);
	mmio_wr(a, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	if (!(mmio_rd(a, VIRTIO_MMIO_DEVICE_FEATURES) & 1))
		return "blk-no-version-1";
	mmio_wr(a, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	mmio_wr(a, VIRTIO_MMIO_DRIVER_FEATURES, 0);
	mmio_wr(a, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	mmio_wr(a, VIRTIO_MMIO_DRIVER_FEATURES, 1);
	status |= STATUS_FEATURES_OK;
	mmio_wr(a, VIRTIO_MMIO_STATUS, status);
	if (!(mmio_rd(a, VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK))
		return "blk-features";
	struct vq *q = &a->q[0];
	volatile struct vring *r = &MEM->vrings[0];
	mmio_wr(a, VIRTIO_MMIO_QUEUE_SEL, 0);
	u32 max = mmio_rd(a, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max < 4)
		return "blk-queue-missing";
	u32 size = QSIZE;
	while (size > max)
		size >>= 1;
	q->r = r;
	q->size = (u16)size;
	q->avail_idx = 0;
	q->used_idx = 0;
	r->avail.flags = 0;
	r->avail.idx = 0;
	r->used.flags = 0;
	r->used.idx = 0;
	mmio_wr(a, VIRTIO_MMIO_QUEUE_NUM, size);
	mmio_addr(a, VIRTIO_MMIO_QUEUE_DESC_LOW, r->desc);
	mmio_addr(a, VIRTIO_MMIO_QUEUE_AVAIL_LOW, &r->avail);
	mmio_addr(a, VIRTIO_MMIO_QUEUE_USED_LOW, &r->used);
	mmio_wr(a, VIRTIO_MMIO_QUEUE_READY, 1);
	*sectors = (u64)mmio_rd(a, VIRTIO_MMIO_CONFIG + 4) << 32 | mmio_rd(a, VIRTIO_MMIO_CONFIG);
	status |= STATUS_DRIVER_OK;
	mmio_wr(a, VIRTIO_MMIO_STATUS, status);
	return 0;
}

/*
 * Reads o->blk_reads times o->blk_kib KiB (one request in flight, sectors
 * walking through the disk), then prints
 * `blk: reads=<n> kib=<k> ms=<elapsed>` (kvmclock or calibrated TSC).
 */
static void blk_main(struct agent *a, const struct agent_options *o)
{
	a->base = o->blk_base;
	a->gsi = VMM_FIRST_GSI + (u32)((a->base - VMM_MMIO_BASE) / VMM_MMIO_WINDOW);
	u64 sectors = 0;
	const char *err = interrupts_init(a, o->tsc_clock);
	if (!err)
		err = blk_virtio_init(a, &sectors);
	if (!err)
		err = ioapic_init(a);
	u64 per_req = (u64)o->blk_kib * 2;
	if (!err && sectors < per_req)
		err = "blk-too-small";
	if (err) {
		fail(err);
		return;
	}
	/* Header and status in tx slot 0, data in the (contiguous) rx buffers. */
	u8 *hdr = MEM->tx_bufs[0];
	volatile u8 *status = MEM->tx_bufs[0] + 16;
	volatile struct vq_desc *d = a->q[0].r->desc;
	u64 slots = sectors / per_req;
	u64 t0 = now_ms(a);
	for (u32 i = 0; i < o->blk_reads; i++) {
		le32(hdr, BLK_T_IN);
		le32(hdr + 4, 0);
		le64(hdr + 8, (i % slots) * per_req);
		*status = 0xff;
		d[0].addr = (u64)(uintptr_t)hdr;
		d[0].len = 16;
		d[0].flags = VRING_DESC_F_NEXT;
		d[0].next = 1;
		d[1].addr = (u64)(uintptr_t)MEM->rx_bufs;
		d[1].len = o->blk_kib * 1024;
		d[1].flags = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE;
		d[1].next = 2;
		d[2].addr = (u64)(uintptr_t)status;
		d[2].len = 1;
		d[2].flags = VRING_DESC_F_WRITE;
		d[2].next = 0;
		vq_publish(&a->q[0], 0);
		vq_kick(a, 0);
		u32 id, len;
		u64 give_up = now_ms(a) + 60000;
		while (!vq_next_used(&a->q[0], &id, &len)) {
			if (agent_irq) {
				agent_irq = 0;
				u32 s = mmio_rd(a, VIRTIO_MMIO_INTERRUPT_STATUS);
				if (s)
					mmio_wr(a, VIRTIO_MMIO_INTERRUPT_ACK, s);
				continue;
			}
			u64 now = now_ms(a);
			if (now >= give_up) {
				fail("blk-timeout");
				return;
			}
			sleep_until(a, now + MAX_SLEEP_MS);
		}
		if (*status != 0) {
			fail("blk-status");
			return;
		}
	}
	u64 ms = now_ms(a) - t0;
	put_str("blk: reads=");
	put_dec(o->blk_reads);
	put_str(" kib=");
	put_dec(o->blk_kib);
	put_str(" ms=");
	put_dec(ms);
	put_char('\n');
}

/* --- entry ---------------------------------------------------------------------------------- */

static void fail(const char *what)
{
	say("error ");
	put_str(what);
	put_char('\n');
}

void agent_main(const struct agent_options *o, u64 usable_ram_bytes, int quiet)
{
	if (o->error) {
		say("error bad-option ");
		put_str(o->error);
		put_char('\n');
		return;
	}
	struct agent *a = &MEM->agent;
	memset(a, 0, sizeof(*a));
	a->base = o->vsock_base;
	a->quiet = quiet;
	a->port = o->port;
	a->interval_ms = o->hb_ms;
	a->mode = o->mode;
	a->crash_after = o->crash_after;
	a->free_kib = usable_ram_bytes / 1024;
	a->backoff_ms = BACKOFF_MIN_MS;
	a->local_port = FIRST_LOCAL_PORT - 1;
	if (o->blk_base) {
		if (o->blk_base < VMM_MMIO_BASE ||
		    (o->blk_base - VMM_MMIO_BASE) / VMM_MMIO_WINDOW >= VMM_MMIO_MAX_DEVICES)
			fail("blk-address");
		else
			blk_main(a, o);
		return;
	}
	if (a->base < VMM_MMIO_BASE || (a->base - VMM_MMIO_BASE) / VMM_MMIO_WINDOW >= VMM_MMIO_MAX_DEVICES) {
		fail("vsock-address"); /* not one of reddog-vmm's virtio-mmio windows */
		return;
	}
	a->gsi = VMM_FIRST_GSI + (u32)((a->base - VMM_MMIO_BASE) / VMM_MMIO_WINDOW);

	const char *err = interrupts_init(a, o->tsc_clock);
	if (!err)
		err = virtio_init(a);
	if (!err)
		err = ioapic_init(a);
	if (err) {
		if (a->q[RXQ].r) /* the device was touched: tell it we gave up */
			mmio_wr(a, VIRTIO_MMIO_STATUS, STATUS_FAILED);
		fail(err);
		return;
	}
	if (o->have_boot_id) {
		for (u32 i = 0; i < 16; i++)
			a->boot_id[i] = o->boot_id[i];
	} else {
		u64 seed = rdtsc() ^ (a->cid << 48);
		le64(a->boot_id, splitmix64(&seed));
		le64(a->boot_id + 8, splitmix64(&seed));
	}
	a->local_port += (u32)(rdtsc() & 0x3ff); /* another port range after a reboot */

	say("vsock base=");
	put_hex(a->base);
	put_str(" irq=");
	put_dec(a->gsi);
	put_str(" cid=");
	put_dec(a->cid);
	put_str(" port=");
	put_dec(a->port);
	put_str(" mode=");
	put_str(mode_names[a->mode]);
	put_str(" clock=");
	if (a->kvmclock) {
		put_str("kvmclock");
	} else {
		put_str("tsc khz=");
		put_dec(a->tsc_per_ms);
	}
	put_str(" boot_id=");
	put_hex_bytes(a->boot_id, 16);
	put_char('\n');

	a->deadline = now_ms(a);
	for (;;) {
		int work = poll_device(a);
		if (work < 0)
			return;
		u64 next = step(a, now_ms(a));
		if (!work)
			sleep_until(a, next);
	}
}
