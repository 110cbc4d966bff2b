/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * ivloop: which offload metadata a record may carry for a given frame.
 *
 * One rule, applied by both ends: the receiver refuses a record whose
 * metadata does not fit its frame (a peer's word is checked, the way
 * virtio_net_hdr_to_skb() checks virtio's), and the sender puts a frame
 * into a ring only when the same rule accepts it, so a frame the receiver
 * would refuse takes the lower NIC instead of vanishing.
 *
 * Like ivl_ring.c, ivl_meta.c uses no netdev types and builds in user
 * space (tests/ring/meta_test.c).
 */
#ifndef IVL_META_H
#define IVL_META_H

#include "ivl_ring.h"

/*
 * Most segments a UDP GSO record may describe.  Linux raised its own
 * UDP_MAX_SEGMENTS from 64 to 128 in 6.11; a record crosses kernels, so
 * the ABI keeps the smaller one and bigger frames go lower.
 */
#define IVL_UDP_MAX_SEGS	64U

/* Bytes of a frame ivl_meta_check() may read: all headers it looks at. */
#define IVL_META_HDR_MAX	256U

/*
 * May a record carry this metadata for this frame?  0 or -EINVAL; the
 * kernel-doc is at the definition in ivl_meta.c.
 */
int ivl_meta_check(const u8 *frame, u32 hlen, u32 len,
		   const struct ivl_rec_meta *m);

#endif /* IVL_META_H */
