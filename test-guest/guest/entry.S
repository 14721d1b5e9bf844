/*
 * Entry points of the reddog test guest.
 *
 *   pvh_start  (LOAD_ADDR + 0)      32-bit PVH entry: protected mode, paging off,
 *                                   ebx = struct hvm_start_info.
 *   entry64    (LOAD_ADDR + 0x200)  64-bit Linux boot protocol entry: long mode,
 *                                   rsi = struct boot_params.
 *
 * Both switch to our own page tables (identity map of the low 4 GiB, the top
 * GiB uncached for the LAPIC and other MMIO), GDT and stack, zero .bss and
 * call guest_main(protocol, info), which reports and writes the boot timer.
 *
 * The page tables are static data, not built at boot: some KVMs (the software
 * "kvm-pvm") emulate every guest instruction at microseconds each, and
 * building 2048 page directory entries there cost ~30 ms before the boot
 * timer. This way about 30 instructions run before guest_main.
 */
#include "guest.h"

	.section .text.head, "ax"

	.code32
	.globl	pvh_start
pvh_start:
	cli
	movl	%ebx, %esi			/* keep hvm_start_info in esi */
	lgdt	gdt_desc
	movl	%cr4, %eax
	orl	$0x20, %eax			/* PAE */
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx		/* EFER */
	rdmsr
	orl	$0x100, %eax			/* LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax		/* PG | PE */
	movl	%eax, %cr0
	ljmp	$GDT_CODE64, $pvh_long

	.code64
pvh_long:
	movl	%esi, %esi			/* zero-extend the start_info address */
	movl	$BOOT_PVH, %r12d
	jmp	common64

	/* The Linux 64-bit boot protocol enters at startup_32 + 0x200. */
	.org	ENTRY64_OFFSET
	.globl	entry64
entry64:
	cli
	movl	$BOOT_LINUX64, %r12d		/* rsi = boot_params */
	movl	$pml4, %eax
	movq	%rax, %cr3
	lgdt	gdt_desc

/* r12d = protocol, rsi = info; our page tables and GDT are loaded. */
common64:
	movq	$stack_top, %rsp
	pushq	$GDT_CODE64
	leaq	1f(%rip), %rax
	pushq	%rax
	lretq
1:	movl	$GDT_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	cld
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	xorl	%eax, %eax
	rep stosb
	movl	%r12d, %edi
	call	guest_main

	.globl	halt_forever
halt_forever:
	cli
	hlt
	jmp	halt_forever

/*
 * Interrupt handlers of the vsock agent (agent.c fills the IDT, only when it
 * runs). The LAPIC timer and the device interrupt just end the `hlt` of the
 * agent's loop; the device's also sets agent_irq, so that the agent reads and
 * acknowledges the device's interrupt status.
 */
	.globl	agent_isr_timer, agent_isr_device, agent_isr_spurious
agent_isr_device:
	movb	$1, agent_irq(%rip)
agent_isr_timer:
	pushq	%rax
	movq	agent_lapic_eoi(%rip), %rax
	movl	$0, (%rax)
	popq	%rax
	iretq
agent_isr_spurious:
	iretq

/*
 * AP trampoline, copied to TRAMPOLINE_ADDR and started by SIPI vector 0x08
 * (cs = 0x0800, ip = 0, real mode). Position independent.
 */
	.section .rodata.trampoline, "a"
	.code16
	.globl	ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
	cli
	xorw	%ax, %ax
	movw	%ax, %ds
	lock incl AP_COUNTER_ADDR
1:	cli
	hlt
	jmp	1b
ap_trampoline_end:
	.code64

	.section .rodata, "a"
	.balign	8
gdt:
	.quad	0				/* null */
	.quad	0x00af9b000000ffff		/* 0x08: 64-bit code */
	.quad	0x00cf93000000ffff		/* 0x10: data */
gdt_end:
	.balign	8
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt

/*
 * PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18, name "Xen"). The descriptor
 * is the 32-bit entry address zero-extended to 8 bytes: rust-vmm linux-loader
 * reads 4 bytes, QEMU reads 8, Linux itself emits 8.
 */
	.section .note.Xen, "a", @note
	.balign	4
	.long	2f - 1f				/* namesz */
	.long	4f - 3f				/* descsz */
	.long	18				/* type */
1:	.asciz	"Xen"
2:	.balign	4
3:	.quad	pvh_start
4:	.balign	4

/* Identity map of the low 4 GiB with 2 MiB pages. */
	.section .data.page_tables, "aw"
	.balign	4096
pml4:	.quad	pdpt + 0x3			/* present | writable */
	.fill	511, 8, 0
pdpt:	.quad	pd + 0x0003, pd + 0x1003, pd + 0x2003, pd + 0x3003
	.fill	508, 8, 0
pd:	.set	page, 0
	.rept	1536				/* 0..3 GiB: present | writable | 2 MiB */
	.quad	page + 0x83
	.set	page, page + 0x200000
	.endr
	.rept	512				/* 3..4 GiB, MMIO: + PWT | PCD */
	.quad	page + 0x9b
	.set	page, page + 0x200000
	.endr

/* Never zeroed: written before it is read. */
	.section .noinit, "aw", @nobits
	.balign	16
stack:	.skip	16384
stack_top:

	.section .note.GNU-stack, "", @progbits
