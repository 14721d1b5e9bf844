/*
 * The optional virtio-net echo of the test guest: every frame it receives
 * goes back with its source and destination MAC swapped. Runs only with
 * `net=<mmio base>` on the command line; see ../README.md.
 */
#ifndef REDDOG_TEST_GUEST_NET_H
#define REDDOG_TEST_GUEST_NET_H

#include "util.h"

struct net_options {
	u64 base;     /* virtio-mmio window; 0: no echo */
	int bad;      /* `net=` did not parse */
	int oversize; /* `net_oversize`: first send one frame one byte over the MTU */
};

/* Parses one token if it is a net option (`net=`, `net_oversize`); returns 0 if not. */
int net_parse_option(struct net_options *o, const char *tok, u32 len);

/* Runs the echo; returns only if the device cannot be used (after `net: error ...`). */
void net_main(const struct net_options *o);

#endif
