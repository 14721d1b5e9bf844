/*
 * The optional guest agent of the test guest: a virtio-vsock client speaking
 * the reddog guest protocol (docs/guest-protocol.md). It runs only when the
 * command line has `vsock=<mmio base>`; see ../README.md.
 */
#ifndef REDDOG_TEST_GUEST_AGENT_H
#define REDDOG_TEST_GUEST_AGENT_H

#include "util.h"

enum hb_mode { HB_NORMAL, HB_SILENT, HB_CRASH, HB_GARBAGE, HB_FLOOD };

/* What the command line says about the agent (parsed in main.c). */
struct agent_options {
	int seen;	   /* an agent option was given; the fields below are valid only then */
	int enabled;	   /* `vsock=` was given */
	const char *error; /* the first agent option that did not parse, or null */
	u64 vsock_base;	   /* virtio-mmio window of the vsock device */
	u32 port;	   /* host port to connect to (CID 2) */
	u32 hb_ms;	   /* heartbeat interval until the host sets one */
	enum hb_mode mode;
	u32 crash_after; /* HB_CRASH: heartbeats before the triple fault */
	int tsc_clock;	 /* `agent_clock=tsc`: no kvmclock, calibrate the TSC */
	int have_boot_id;
	u8 boot_id[16];
	/* `blk=<mmio base>`: instead of the vsock agent, time `blk_reads` reads of
	 * `blk_kib` KiB each from that virtio-blk device, one at a time. */
	u64 blk_base;
	u32 blk_reads;
	u32 blk_kib;
};

/* Default values of the agent options. */
#define AGENT_DEFAULT_PORT 1024
#define AGENT_DEFAULT_HB_MS 1000
#define AGENT_DEFAULT_CRASH_AFTER 3
#define AGENT_DEFAULT_BLK_READS 16
#define AGENT_DEFAULT_BLK_KIB 64

/*
 * Could a token starting with c be an agent option (vsock=, agent_port=,
 * agent_clock=, hb_ms=, hb_mode=, crash_after=, boot_id=, blk=, blk_reads=, blk_kib=)? A few instructions, so that
 * command lines without agent options pay next to nothing.
 */
static inline int agent_option_letter(char c)
{
	u32 d = (u32)(u8)c - 'a';
	return d < 26 && ((((1u << ('v' - 'a')) | (1u << ('a' - 'a')) | (1u << ('h' - 'a')) |
			    (1u << ('c' - 'a')) | (1u << ('b' - 'a'))) >> d) & 1);
}

/*
 * Parses one command line token if it is an agent option; returns 0 if the
 * token is not one of ours. The first call sets up the defaults.
 */
int agent_parse_option(struct agent_options *o, const char *tok, u32 len);

/*
 * Runs the agent. Returns only if the device or the machine cannot be used
 * (after printing `agent: error ...`); the caller then leaves as usual. On the
 * host's Shutdown it powers the VM off itself.
 */
void agent_main(const struct agent_options *o, u64 usable_ram_bytes, int quiet);

/* main.c: powers off through ACPI (prints `exit: acpi` unless quiet). */
void agent_power_off(int quiet) __attribute__((noreturn));
/* main.c: triple-faults (prints `exit: triple-fault` unless quiet). */
void agent_triple_fault(int quiet) __attribute__((noreturn));

#endif
