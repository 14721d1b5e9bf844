/*
 * Entry points of the reddog test guest.
 *
 *   pvh_start  (LOAD_ADDR + 0)      32-bit PVH entry: protected mode, paging off,
 *                                   ebx = struct hvm_start_info.
 *   entry64    (LOAD_ADDR + 0x200)  64-bit Linux boot protocol entry: long mode,
 *                                   rsi = struct boot_params.
 *
 * The PVH entry does as little as it can before paging is on (some KVMs, such
 * as the software "kvm-pvm", emulate every instruction run without paging, at
 * microseconds each): it enters long mode on a static boot page table and
 * joins the 64-bit entry. From there both zero .bss, build the real page
 * tables (identity map of the low 4 GiB with 2 MiB pages, the top GiB
 * uncached for the LAPIC and other MMIO), load their own GDT and stack and
 * call guest_main(protocol, info).
 */
#include "guest.h"

/* PML4[0] -> PDPT, PDPT[0..3] -> four PDs, PD entries = 2 MiB pages. */
/* Uses eax and ecx. */
.macro BUILD_PAGE_TABLES
	movl	$pdpt + 0x3, %eax		/* present | writable */
	movl	%eax, pml4
	movl	$pd + 0x3, %eax
	xorl	%ecx, %ecx
1:	movl	%eax, pdpt(,%rcx,8)
	addl	$4096, %eax
	incl	%ecx
	cmpl	$4, %ecx
	jne	1b
	movl	$0x83, %eax			/* present | writable | 2 MiB page */
	xorl	%ecx, %ecx
2:	cmpl	$1536, %ecx			/* 3 GiB and up: MMIO, cache disabled */
	jne	3f
	orl	$0x18, %eax			/* PWT | PCD */
3:	movl	%eax, pd(,%rcx,8)
	addl	$0x200000, %eax
	incl	%ecx
	cmpl	$2048, %ecx
	jne	2b
.endm

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
	movl	$boot_page_table, %eax
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
	movl	$BOOT_PVH, %edi
	jmp	common64

	/* The Linux 64-bit boot protocol enters at startup_32 + 0x200. */
	.org	ENTRY64_OFFSET
	.globl	entry64
entry64:
	cli
	movl	$BOOT_LINUX64, %edi		/* rsi = boot_params */

/* edi = protocol, rsi = info; only the low 2 MiB are known to be mapped. */
common64:
	cld
	movl	%edi, %r8d
	movl	$__bss_start, %edi		/* zero .bss (page tables and stack live there) */
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	xorl	%eax, %eax
	rep stosb
	BUILD_PAGE_TABLES
	lgdt	gdt_desc
	movl	$pml4, %eax
	movq	%rax, %cr3
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
	movl	%r8d, %edi
	call	guest_main

	.globl	halt_forever
halt_forever:
	cli
	hlt
	jmp	halt_forever

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

/*
 * Boot page table of the PVH entry: one page that is its own PML4, PDPT, PD
 * and page table (entry 0 points back to the page), whose entries 256..511
 * identity-map 1 MiB..2 MiB with 4 KiB pages: the image, .bss and stack.
 */
	.section .data.boot_page_table, "aw"
	.balign	4096
boot_page_table:
	.quad	boot_page_table + 0x3		/* present | writable */
	.fill	255, 8, 0
	.set	page, 0x100000
	.rept	256
	.quad	page + 0x3
	.set	page, page + 0x1000
	.endr

	.section .bss, "aw", @nobits
	.balign	4096
pml4:	.skip	4096
pdpt:	.skip	4096
pd:	.skip	4 * 4096
	.balign	16
stack:	.skip	16384
stack_top:

	.section .note.GNU-stack, "", @progbits
