/* Constants shared by the assembly entry code and the C part of the test guest. */
#ifndef REDDOG_TEST_GUEST_H
#define REDDOG_TEST_GUEST_H

/* Where the image is linked and loaded; the 64-bit entry is at LOAD_ADDR + 0x200. */
#define LOAD_ADDR 0x100000
#define ENTRY64_OFFSET 0x200

/* Boot protocol numbers passed from the entry code to guest_main(). */
#define BOOT_PVH 0
#define BOOT_LINUX64 1

/* Our own GDT selectors. */
#define GDT_CODE64 0x08
#define GDT_DATA 0x10

/* The AP trampoline is copied here (SIPI vector 0x08); APs increment the counter. */
#define TRAMPOLINE_ADDR 0x8000
#define AP_COUNTER_ADDR 0x8ff0

/* Longest command line we read (bytes, without the terminating NUL). */
#define CMDLINE_MAX 4095

/*
 * Memory of the optional vsock agent (queues, buffers, IDT, state): reserved
 * after the stack, not in the file and not zeroed at boot (the agent
 * initialises what it uses, and only when it runs).
 */
#define AGENT_MEM_SIZE 0x20000
/* Memory of the optional virtio-net echo (net.c), reserved the same way. */
#define NET_MEM_SIZE 0x10000

#endif
