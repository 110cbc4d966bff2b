/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ivloop: every difference between the kernels the module builds for.
 *
 * Built and tested against Debian 12's 6.1 and bookworm-backports' 6.12;
 * the versions in between follow the same upstream changes.  The .c files
 * are written for the newest API; older kernels get it here, spelled with
 * what they have.  No other file tests the kernel version.
 *
 * checkpatch warns about LINUX_VERSION_CODE because in-tree code is only
 * ever for the version it is merged into; an out-of-tree module built by
 * DKMS for every kernel a distribution ships is the case it does not
 * cover, so guest-driver/Makefile checks this file with that one check
 * ignored.
 */
#ifndef IVL_COMPAT_H
#define IVL_COMPAT_H

#include <linux/netdevice.h>
#include <linux/version.h>

/* true when building for kernel @major.@minor or later */
#define IVL_KERNEL_AT_LEAST(major, minor)				\
	(KERNEL_VERSION(major, minor, 0) <= LINUX_VERSION_CODE)

/* 6.12: <asm/unaligned.h> moved to <linux/unaligned.h> */
#if IVL_KERNEL_AT_LEAST(6, 12)
#include <linux/unaligned.h>
#else
#include <asm/unaligned.h>
#endif

/* 6.6: <net/page_pool.h> was split; the allocation helpers moved */
#if IVL_KERNEL_AT_LEAST(6, 6)
#include <net/page_pool/helpers.h>
#else
#include <net/page_pool.h>
#endif

/* 6.12: NETIF_F_NETNS_LOCAL became a bit of struct net_device */
static inline void ivl_dev_set_netns_local(struct net_device *dev)
{
#if IVL_KERNEL_AT_LEAST(6, 12)
	dev->netns_local = true;
#else
	dev->features |= NETIF_F_NETNS_LOCAL;
#endif
}

#endif /* IVL_COMPAT_H */
