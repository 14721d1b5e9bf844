/*
 * The reddog test guest: reports what the VMM handed it (boot protocol,
 * command line, memory map, ACPI tables, vCPUs) on the serial port, then
 * leaves the way the command line asks. See ../README.md for the output format.
 *
 * Everything read from guest memory was written by the VMM under test, so
 * every pointer is range checked and every walk is bounded.
 */
#include "guest.h"
#include "util.h"
#include "agent.h"
#include "net.h"

/* --- ports and machine registers ---------------------------------------- */

#define PORT_COM1 0x3f8
#define PORT_BOOT_TIMER 0x440
#define BOOT_TIMER_MAGIC 123
#define PORT_ACPI_SLEEP_CONTROL 0x600
#define ACPI_SLEEP_S5 ((5 << 2) | 0x20)
#define PORT_ACPI_RESET 0x602
#define ACPI_RESET_VALUE 0x01
#define PORT_I8042_COMMAND 0x64
#define I8042_RESET 0xfe
#define PORT_DEBUG_EXIT 0xf4

#define MSR_X2APIC_SVR 0x80f
#define MSR_X2APIC_ICR 0x830
#define XAPIC_SVR 0xf0
#define XAPIC_ICR_LOW 0x300
#define XAPIC_ICR_HIGH 0x310
#define ICR_DELIVERY_PENDING (1u << 12)
#define ICR_INIT_ALL_BUT_SELF 0x000c4500u
#define ICR_SIPI_ALL_BUT_SELF (0x000c4600u | (TRAMPOLINE_ADDR >> 12))

/* Bounds on what we accept from the VMM. */
#define MEMMAP_MAX 128
#define ACPI_TABLE_MAX (1u << 20)

/* Rough TSC budgets (cycles) for the AP bring-up. */
#define INIT_DELAY_CYCLES 10000000ull
#define SIPI_DELAY_CYCLES 1000000ull
#define AP_WAIT_CYCLES 1000000000ull
/* How long a power-off write gets to take effect before we call it ignored. */
#define EXIT_GRACE_CYCLES 200000000ull

void halt_forever(void) __attribute__((noreturn));
void guest_main(u32 protocol, u64 info) __attribute__((noreturn));
extern const u8 ap_trampoline_start[], ap_trampoline_end[];

/* Waits about `cycles` TSC cycles; also bounded by iterations if the TSC is stuck. */
static void delay(u64 cycles)
{
	u64 start = rdtsc();
	for (u64 i = 0; i < cycles / 16 && rdtsc() - start < cycles; i++)
		cpu_relax();
}

/* --- serial output -------------------------------------------------------- */

/* The VMM's UART is always ready, so we skip the LSR poll: one exit per byte. */
void put_char(char c)
{
	outb(PORT_COM1, (u8)c);
}

void put_str(const char *s)
{
	while (*s)
		put_char(*s++);
}

void put_hex(u64 v)
{
	char buf[16];
	int n = 0;
	put_str("0x");
	do {
		buf[n++] = "0123456789abcdef"[v & 0xf];
		v >>= 4;
	} while (v);
	while (n)
		put_char(buf[--n]);
}

void put_dec(u64 v)
{
	char buf[20];
	int n = 0;
	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		put_char(buf[--n]);
}

/* --- what the VMM told us ------------------------------------------------- */

struct memmap_entry {
	u64 base;
	u64 size;
	u32 type;
};

struct boot_info {
	const char *protocol;
	const char *problem; /* non-null if the boot structure was unusable */
	char cmdline[CMDLINE_MAX + 1];
	u32 memmap_entries;
	struct memmap_entry memmap[MEMMAP_MAX];
	u64 rsdp;
};

static void copy_cmdline(struct boot_info *boot, u64 addr)
{
	u32 n = 0;
	if (addr != 0) {
		for (; n < CMDLINE_MAX && phys_ok(addr, n + 1); n++) {
			u8 c = rd8(addr + n);
			if (c == 0)
				break;
			boot->cmdline[n] = (char)c;
		}
	}
	boot->cmdline[n] = 0;
}

#define PVH_MAGIC 0x336ec578u
#define PVH_INFO_SIZE 56
#define PVH_MEMMAP_ENTRY_SIZE 24

static void read_pvh(struct boot_info *boot, u64 info)
{
	boot->protocol = "pvh";
	if (!phys_ok(info, PVH_INFO_SIZE)) {
		boot->problem = "bad-start-info-address";
		return;
	}
	if (rd32(info) != PVH_MAGIC) {
		boot->problem = "bad-start-info-magic";
		return;
	}
	u32 version = rd32(info + 4);
	copy_cmdline(boot, rd64(info + 24));
	boot->rsdp = rd64(info + 32);
	if (version < 1)
		return; /* no memory map before version 1 */
	u64 map = rd64(info + 40);
	u32 entries = rd32(info + 48);
	if (entries > MEMMAP_MAX)
		entries = MEMMAP_MAX;
	if (entries == 0)
		return;
	if (!phys_ok(map, (u64)entries * PVH_MEMMAP_ENTRY_SIZE)) {
		boot->problem = "bad-memmap-address";
		return;
	}
	for (u32 i = 0; i < entries; i++) {
		u64 e = map + (u64)i * PVH_MEMMAP_ENTRY_SIZE;
		boot->memmap[i].base = rd64(e);
		boot->memmap[i].size = rd64(e + 8);
		boot->memmap[i].type = rd32(e + 16);
	}
	boot->memmap_entries = entries;
}

#define BP_SIZE 4096
#define BP_ACPI_RSDP_ADDR 0x070
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define E820_ENTRY_SIZE 20

static void read_boot_params(struct boot_info *boot, u64 bp)
{
	boot->protocol = "linux64";
	if (!phys_ok(bp, BP_SIZE)) {
		boot->problem = "bad-boot-params-address";
		return;
	}
	copy_cmdline(boot, (u64)rd32(bp + BP_CMD_LINE_PTR) | ((u64)rd32(bp + BP_EXT_CMD_LINE_PTR) << 32));
	boot->rsdp = rd64(bp + BP_ACPI_RSDP_ADDR);
	u32 entries = rd8(bp + BP_E820_ENTRIES);
	if (entries > MEMMAP_MAX)
		entries = MEMMAP_MAX;
	for (u32 i = 0; i < entries; i++) {
		u64 e = bp + BP_E820_TABLE + (u64)i * E820_ENTRY_SIZE;
		boot->memmap[i].base = rd64(e);
		boot->memmap[i].size = rd64(e + 8);
		boot->memmap[i].type = rd32(e + 16);
	}
	boot->memmap_entries = entries;
}

/* --- command line options --------------------------------------------------- */

enum exit_mode { EXIT_ACPI, EXIT_ACPI_RESET, EXIT_I8042, EXIT_DEBUG_EXIT, EXIT_TRIPLE_FAULT, EXIT_HANG, EXIT_SPIN };

static const char *const exit_names[] = {
	[EXIT_ACPI] = "acpi",
	[EXIT_ACPI_RESET] = "acpi-reset",
	[EXIT_I8042] = "i8042",
	[EXIT_DEBUG_EXIT] = "debug-exit",
	[EXIT_TRIPLE_FAULT] = "triple-fault",
	[EXIT_HANG] = "hang",
	[EXIT_SPIN] = "spin",
};

struct options {
	enum exit_mode exit;
	int smp;
	int quiet;
	struct agent_options agent;
	struct net_options net;
};

/* Does the token [tok, tok + len) equal the string s? */
int token_is(const char *tok, u32 len, const char *s)
{
	u32 i = 0;
	for (; i < len; i++)
		if (s[i] != tok[i])
			return 0;
	return s[i] == 0;
}

static void parse_options(const char *cmdline, struct options *o)
{
	/* Field by field: no memset/memcpy of the agent options on the boot path. */
	o->exit = EXIT_ACPI;
	o->smp = 1;
	o->quiet = 0;
	o->agent.seen = 0; /* the rest is set up by the first agent option */
	o->net.base = 0;
	o->net.bad = 0;
	o->net.oversize = 0;
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		const char *tok = p;
		while (*p && *p != ' ' && *p != '\t' && *p != '\n')
			p++;
		u32 len = (u32)(p - tok);
		if (len == 0)
			continue;
		for (u32 m = 0; m < sizeof(exit_names) / sizeof(exit_names[0]); m++)
			if (len > 5 && token_is(tok, 5, "exit=") && token_is(tok + 5, len - 5, exit_names[m]))
				o->exit = (enum exit_mode)m;
		if (token_is(tok, len, "smp=0"))
			o->smp = 0;
		if (token_is(tok, len, "quiet"))
			o->quiet = 1;
		if (agent_option_letter(tok[0]))
			agent_parse_option(&o->agent, tok, len);
		if (tok[0] == 'n')
			net_parse_option(&o->net, tok, len);
	}
}

/* --- ACPI ------------------------------------------------------------------ */

#define SDT_HEADER_SIZE 36
#define MADT_ENTRIES_OFFSET 44

struct acpi_result {
	const char *error_table; /* on error: "rsdp", "xsdt", "rsdt", "madt" or null */
	const char *error;	 /* on error: what went wrong; null if all is well */
	u64 rsdp;
	const char *root; /* "xsdt" or "rsdt" */
	u32 madt_cpus;
};

static u8 checksum(u64 addr, u32 len)
{
	u8 sum = 0;
	for (u32 i = 0; i < len; i++)
		sum = (u8)(sum + rd8(addr + i));
	return sum;
}

static int signature_is(u64 addr, const char *sig, u32 len)
{
	for (u32 i = 0; i < len; i++)
		if (rd8(addr + i) != (u8)sig[i])
			return 0;
	return 1;
}

/* Finds an RSDP with a valid signature and checksum in the BIOS area. */
static u64 scan_rsdp(void)
{
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (signature_is(a, "RSD PTR ", 8) && checksum(a, 20) == 0)
			return a;
	return 0;
}

/*
 * Validates the system description table at addr with signature sig: returns
 * its length, or 0 with *err set to what is wrong.
 */
static u32 check_sdt(u64 addr, const char *sig, const char **err)
{
	if (!phys_ok(addr, SDT_HEADER_SIZE)) {
		*err = "address";
		return 0;
	}
	if (!signature_is(addr, sig, 4)) {
		*err = "signature";
		return 0;
	}
	u32 len = rd32(addr + 4);
	if (len < SDT_HEADER_SIZE || len > ACPI_TABLE_MAX || !phys_ok(addr, len)) {
		*err = "length";
		return 0;
	}
	if (checksum(addr, len) != 0) {
		*err = "checksum";
		return 0;
	}
	return len;
}

/* Counts the enabled processors (local APIC and x2APIC entries) in the MADT. */
static const char *count_madt_cpus(u64 madt, u32 len, u32 *cpus)
{
	if (len < MADT_ENTRIES_OFFSET)
		return "length";
	u32 n = 0;
	for (u32 off = MADT_ENTRIES_OFFSET; off < len;) {
		if (len - off < 2)
			return "entry";
		u8 type = rd8(madt + off);
		u8 elen = rd8(madt + off + 1);
		if (elen < 2 || elen > len - off)
			return "entry";
		if (type == 0) { /* processor local APIC: uid, apic id, flags */
			if (elen < 8)
				return "entry";
			n += rd32(madt + off + 4) & 1;
		} else if (type == 9) { /* processor local x2APIC: reserved, x2apic id, flags, uid */
			if (elen < 16)
				return "entry";
			n += rd32(madt + off + 8) & 1;
		}
		off += elen;
	}
	*cpus = n;
	return 0;
}

static struct acpi_result acpi_error(struct acpi_result r, const char *table, const char *what)
{
	r.error_table = table;
	r.error = what;
	return r;
}

/* RSDP -> XSDT (or RSDT for ACPI 1.0 RSDPs) -> MADT. */
static struct acpi_result read_acpi(u64 hint)
{
	struct acpi_result r = { 0 };
	u64 rsdp = hint != 0 ? hint : scan_rsdp();
	if (rsdp == 0)
		return acpi_error(r, 0, "no-rsdp");
	r.rsdp = rsdp;
	if (!phys_ok(rsdp, 20))
		return acpi_error(r, "rsdp", "address");
	if (!signature_is(rsdp, "RSD PTR ", 8))
		return acpi_error(r, "rsdp", "signature");
	if (checksum(rsdp, 20) != 0)
		return acpi_error(r, "rsdp", "checksum");

	u64 root;
	u32 entry_size;
	if (rd8(rsdp + 15) >= 2) {
		u32 len = rd32(rsdp + 20);
		if (len < 36 || len > 4096 || !phys_ok(rsdp, len))
			return acpi_error(r, "rsdp", "length");
		if (checksum(rsdp, len) != 0)
			return acpi_error(r, "rsdp", "extended-checksum");
		root = rd64(rsdp + 24);
		entry_size = 8;
		r.root = "xsdt";
	} else {
		root = rd32(rsdp + 16);
		entry_size = 4;
		r.root = "rsdt";
	}

	const char *err = 0;
	u32 root_len = check_sdt(root, entry_size == 8 ? "XSDT" : "RSDT", &err);
	if (root_len == 0)
		return acpi_error(r, r.root, err);
	if ((root_len - SDT_HEADER_SIZE) % entry_size != 0)
		return acpi_error(r, r.root, "length");

	u32 entries = (root_len - SDT_HEADER_SIZE) / entry_size;
	for (u32 i = 0; i < entries; i++) {
		u64 at = root + SDT_HEADER_SIZE + (u64)i * entry_size;
		u64 table = entry_size == 8 ? rd64(at) : rd32(at);
		if (!phys_ok(table, SDT_HEADER_SIZE))
			return acpi_error(r, r.root, "entry");
		if (!signature_is(table, "APIC", 4))
			continue;
		u32 madt_len = check_sdt(table, "APIC", &err);
		if (madt_len == 0)
			return acpi_error(r, "madt", err);
		err = count_madt_cpus(table, madt_len, &r.madt_cpus);
		return err ? acpi_error(r, "madt", err) : r;
	}
	return acpi_error(r, 0, "no-madt");
}

/* --- SMP --------------------------------------------------------------------- */

struct lapic {
	int x2apic;
	u64 base;
};

static void lapic_send_ipi(const struct lapic *apic, u32 icr)
{
	if (apic->x2apic) {
		wrmsr(MSR_X2APIC_ICR, icr);
		return;
	}
	wr32(apic->base + XAPIC_ICR_HIGH, 0);
	wr32(apic->base + XAPIC_ICR_LOW, icr);
	for (u32 i = 0; i < 1000000 && (rd32(apic->base + XAPIC_ICR_LOW) & ICR_DELIVERY_PENDING); i++)
		cpu_relax();
}

/*
 * Sends INIT-SIPI-SIPI to all other CPUs and returns how many of them ran the
 * trampoline; stops waiting once `expected` did (0: unknown), or after
 * AP_WAIT_CYCLES.
 */
static u32 start_aps(u32 expected)
{
	u32 a, b, c, d;
	cpuid(1, &a, &b, &c, &d);
	if (!(d & (1u << 9)))
		return 0; /* no local APIC */
	u64 apic_base = rdmsr(MSR_APIC_BASE);
	if (!(apic_base & (1u << 11)))
		return 0; /* APIC globally disabled */
	struct lapic apic = { .x2apic = (apic_base & (1u << 10)) != 0, .base = apic_base & 0xfffff000ull };
	if (!apic.x2apic && !phys_ok(apic.base, 4096))
		return 0;

	volatile u8 *tramp = phys(TRAMPOLINE_ADDR);
	for (u64 i = 0; i < (u64)(ap_trampoline_end - ap_trampoline_start); i++)
		tramp[i] = ap_trampoline_start[i];
	volatile u32 *counter = (volatile u32 *)phys(AP_COUNTER_ADDR);
	*counter = 0;

	/* Software-enable the APIC (spurious vector 0xff). */
	if (apic.x2apic)
		wrmsr(MSR_X2APIC_SVR, rdmsr(MSR_X2APIC_SVR) | 0x1ff);
	else
		wr32(apic.base + XAPIC_SVR, rd32(apic.base + XAPIC_SVR) | 0x1ff);

	lapic_send_ipi(&apic, ICR_INIT_ALL_BUT_SELF);
	delay(INIT_DELAY_CYCLES);
	lapic_send_ipi(&apic, ICR_SIPI_ALL_BUT_SELF);
	delay(SIPI_DELAY_CYCLES);
	lapic_send_ipi(&apic, ICR_SIPI_ALL_BUT_SELF);

	u64 start = rdtsc();
	for (u64 i = 0; i < AP_WAIT_CYCLES / 16 && rdtsc() - start < AP_WAIT_CYCLES; i++) {
		if (expected != 0 && *counter >= expected)
			break;
		cpu_relax();
	}
	return *counter;
}

/* --- leaving ------------------------------------------------------------------- */

static void __attribute__((noreturn)) leave(enum exit_mode mode, int quiet)
{
	if (!quiet) {
		put_str("exit: ");
		put_str(exit_names[mode]);
		put_char('\n');
	}
	switch (mode) {
	case EXIT_ACPI:
		outb(PORT_ACPI_SLEEP_CONTROL, ACPI_SLEEP_S5);
		break;
	case EXIT_ACPI_RESET:
		outb(PORT_ACPI_RESET, ACPI_RESET_VALUE);
		break;
	case EXIT_I8042:
		outb(PORT_I8042_COMMAND, I8042_RESET);
		break;
	case EXIT_DEBUG_EXIT:
		outb(PORT_DEBUG_EXIT, 0); /* QEMU exits with status 1 */
		break;
	case EXIT_TRIPLE_FAULT: {
		/* #UD with an empty IDT: #GP, #DF, shutdown. (ud2 first: kvm-pvm fails to
		 * emulate int3 through an empty IDT instead of faulting.) */
		struct __attribute__((packed)) {
			u16 limit;
			u64 base;
		} idtr = { 0, 0 };
		__asm__ volatile("lidt %0\n\tud2\n\tint3" : : "m"(idtr));
		break;
	}
	case EXIT_HANG:
		halt_forever();
	case EXIT_SPIN:
		for (;;)
			__asm__ volatile("" : : : "memory");
	}
	/* The VMM should have stopped us by now; give it a moment, then say so. */
	delay(EXIT_GRACE_CYCLES);
	put_str("exit: still-running\n");
	halt_forever();
}

void agent_power_off(int quiet)
{
	leave(EXIT_ACPI, quiet);
}

void agent_triple_fault(int quiet)
{
	leave(EXIT_TRIPLE_FAULT, quiet);
}

/* Bytes of usable RAM (type 1) in the memory map. */
static u64 usable_ram(const struct boot_info *boot)
{
	u64 total = 0;
	for (u32 i = 0; i < boot->memmap_entries; i++)
		if (boot->memmap[i].type == 1)
			total += boot->memmap[i].size;
	return total;
}

/* --- main ----------------------------------------------------------------------- */

void guest_main(u32 protocol, u64 info)
{
	put_str("reddog-test-guest: hello\n");
	outb(PORT_BOOT_TIMER, BOOT_TIMER_MAGIC);

	/* On the stack and not zeroed as a whole: fewer instructions before we report. */
	struct boot_info boot;
	boot.problem = 0;
	boot.cmdline[0] = 0;
	boot.memmap_entries = 0;
	boot.rsdp = 0;
	if (protocol == BOOT_PVH)
		read_pvh(&boot, info);
	else
		read_boot_params(&boot, info);
	struct options opt;
	parse_options(boot.cmdline, &opt);
	if (opt.quiet) {
		if (opt.agent.seen && opt.agent.enabled)
			agent_main(&opt.agent, usable_ram(&boot), 1);
		if (opt.net.base)
			net_main(&opt.net);
		leave(opt.exit, 1);
	}

	put_str("boot-protocol: ");
	put_str(boot.protocol);
	if (boot.problem) {
		put_str(" error ");
		put_str(boot.problem);
	}
	put_str("\ncmdline: ");
	put_str(boot.cmdline);
	put_char('\n');
	for (u32 i = 0; i < boot.memmap_entries; i++) {
		put_str("memmap: ");
		put_dec(i);
		put_char(' ');
		put_hex(boot.memmap[i].base);
		put_char(' ');
		put_hex(boot.memmap[i].size);
		put_char(' ');
		put_dec(boot.memmap[i].type);
		put_char('\n');
	}

	struct acpi_result acpi = read_acpi(boot.rsdp);
	if (acpi.error) {
		put_str("acpi: error ");
		if (acpi.error_table) {
			put_str(acpi.error_table);
			put_char('-');
		}
		put_str(acpi.error);
		put_char('\n');
	} else {
		put_str("acpi: rsdp=");
		put_hex(acpi.rsdp);
		put_char(' ');
		put_str(acpi.root);
		put_str("=ok madt=ok\n");
	}

	put_str("cpus: madt=");
	put_dec(acpi.madt_cpus);
	put_str(" online=");
	if (opt.smp) {
		u32 aps = 0;
		if (acpi.error) /* we do not know how many to expect: wait the whole budget */
			aps = start_aps(0);
		else if (acpi.madt_cpus > 1)
			aps = start_aps(acpi.madt_cpus - 1);
		put_dec(1 + (u64)aps);
	} else {
		put_str("skipped");
	}
	put_char('\n');

	if (opt.agent.seen && opt.agent.enabled)
		agent_main(&opt.agent, usable_ram(&boot), 0);
	if (opt.net.base)
		net_main(&opt.net);
	leave(opt.exit, 0);
}

/* GCC may emit calls to these even in freestanding code. */
void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}
