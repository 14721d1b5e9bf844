/*
 * Entry points of the reddog test guest.
 *
 *   pvh_start  (LOAD_ADDR + 0)      32-bit PVH entry: protected mode, paging off,
 *                                   ebx = struct hvm_start_info.
 *   entry64    (LOAD_ADDR + 0x200)  64-bit Linux boot protocol entry: long mode,
 *                                   rsi = struct boot_params.
 *
 * Both zero .bss, build their own page tables (identity map of the low 4 GiB
 * with 2 MiB pages, the top GiB uncached for the LAPIC and other MMIO), load
 * their own GDT and stack and call guest_main(protocol, info).
 */
#include "guest.h"

/* PML4[0] -> PDPT, PDPT[0..3] -> four PDs, PD entries = 2 MiB pages. */
/* Uses eax and ecx; the 32-bit addressing works in both modes. */
.macro BUILD_PAGE_TABLES
	movl	$pdpt + 0x3, %eax		/* present | writable */
	movl	%eax, pml4
	movl	$pd + 0x3, %eax
	xorl	%ecx, %ecx
1:	movl	%eax, pdpt(,%ecx,8)
	addl	$4096, %eax
	incl	%ecx
	cmpl	$4, %ecx
	jne	1b
	movl	$0x83, %eax			/* present | writable | 2 MiB page */
	xorl	%ecx, %ecx
2:	cmpl	$1536, %ecx			/* 3 GiB and up: MMIO, cache disabled */
	jne	3f
	orl	$0x18, %eax			/* PWT | PCD */
3:	movl	%eax, pd(,%ecx,8)
	addl	$0x200000, %eax
	incl	%ecx
	cmpl	$2048, %ecx
	jne	2b
.endm

.macro ZERO_BSS
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	xorl	%eax, %eax
	rep stosb
.endm

	.section .text.head, "ax"

	.code32
	.globl	pvh_start
pvh_start:
	cli
	cld
	movl	%ebx, %esi			/* keep hvm_start_info in esi */
	ZERO_BSS
	BUILD_PAGE_TABLES
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
	movl	$GDT_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movq	$stack_top, %rsp
	movl	%esi, %esi			/* zero-extend the start_info address */
	movl	$BOOT_PVH, %edi
	call	guest_main
	jmp	halt_forever

	/* The Linux 64-bit boot protocol enters at startup_32 + 0x200. */
	.org	ENTRY64_OFFSET
	.globl	entry64
entry64:
	cli
	cld
	/* rsi = boot_params; ZERO_BSS and BUILD_PAGE_TABLES leave it alone. */
	ZERO_BSS
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
	movl	$BOOT_LINUX64, %edi
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

	.section .bss, "aw", @nobits
	.balign	4096
pml4:	.skip	4096
pdpt:	.skip	4096
pd:	.skip	4 * 4096
	.balign	16
stack:	.skip	16384
stack_top:

	.section .note.GNU-stack, "", @progbits
