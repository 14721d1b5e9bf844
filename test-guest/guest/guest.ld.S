/*
 * Linker script of the test guest, run through the C preprocessor:
 * with -DPVH_NOTE the ELF carries the Xen PVH entry note in a PT_NOTE
 * program header; without it the note is dropped (plain 64-bit ELF, and the
 * flat payload of the bzImage).
 */
#include "guest.h"

OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
ENTRY(entry64)

PHDRS
{
	load PT_LOAD FLAGS(7);
#ifdef PVH_NOTE
	note PT_NOTE FLAGS(4);
#endif
}

SECTIONS
{
	. = LOAD_ADDR;
	.text : {
		KEEP(*(.text.head))
		*(.text .text.*)
	} :load
	.rodata : {
		*(.rodata .rodata.*)
	} :load
	.data : {
		*(.data .data.*)
	} :load
#ifdef PVH_NOTE
	.note.Xen : {
		KEEP(*(.note.Xen))
	} :load :note
#endif
	.bss : {
		__bss_start = .;
		*(.bss .bss.* COMMON)
		__bss_end = .;
	} :load
	/* The stack and the agent's and echo's memory: not zeroed at boot. */
	.noinit (NOLOAD) : {
		*(.noinit)
		. = ALIGN(4096);
		agent_mem = .;
		. += AGENT_MEM_SIZE;
		net_mem = .;
		. += NET_MEM_SIZE;
	} :load

	/DISCARD/ : {
		*(.note.Xen)
		*(.note.GNU-stack)
		*(.note.gnu.*)
		*(.comment)
		*(.eh_frame .eh_frame_hdr)
	}
}

ASSERT(pvh_start == LOAD_ADDR, "the PVH entry must start the image")
ASSERT(entry64 == LOAD_ADDR + ENTRY64_OFFSET, "the 64-bit entry must be at 0x200 into the image")
