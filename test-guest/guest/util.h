/*
 * C-only helpers shared by main.c and agent.c: fixed-size types, port and MSR
 * access, range-checked physical memory access, and the serial output
 * functions (defined in main.c).
 */
#ifndef REDDOG_TEST_GUEST_UTIL_H
#define REDDOG_TEST_GUEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* Everything below 4 GiB is identity mapped by entry.S; nothing else is. */
#define PHYS_LIMIT (4ull << 30)

#define MSR_APIC_BASE 0x1b

static inline void outb(u16 port, u8 value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 value)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)));
}

static inline void cpuid(u32 leaf, u32 *eax, u32 *ebx, u32 *ecx, u32 *edx)
{
	__asm__ volatile("cpuid" : "=a"(*eax), "=b"(*ebx), "=c"(*ecx), "=d"(*edx) : "a"(leaf), "c"(0));
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" : : : "memory");
}

static inline void barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

/* Is [addr, addr + len) non-null and inside our identity map? */
static inline int phys_ok(u64 addr, u64 len)
{
	return addr != 0 && len <= PHYS_LIMIT && addr <= PHYS_LIMIT - len;
}

/* A pointer to physical memory the compiler cannot reason about. */
static inline volatile u8 *phys(u64 addr)
{
	volatile u8 *p = (volatile u8 *)(uintptr_t)addr;
	__asm__("" : "+r"(p));
	return p;
}

typedef u32 __attribute__((aligned(1), may_alias)) u32_unaligned;
typedef u64 __attribute__((aligned(1), may_alias)) u64_unaligned;

static inline u8 rd8(u64 addr) { return *phys(addr); }
static inline u32 rd32(u64 addr) { return *(volatile u32_unaligned *)phys(addr); }
static inline u64 rd64(u64 addr) { return *(volatile u64_unaligned *)phys(addr); }
static inline void wr32(u64 addr, u32 v) { *(volatile u32_unaligned *)phys(addr) = v; }

/* Serial output (COM1), main.c. */
void put_char(char c);
void put_str(const char *s);
void put_hex(u64 v);
void put_dec(u64 v);

/* main.c: does the token [tok, tok + len) equal the string s? */
int token_is(const char *tok, u32 len, const char *s);

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

#endif
