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

/**
 * ivl_meta_check() - may a record carry @m for this frame?
 * @frame: the frame's first @hlen bytes, starting at the Ethernet header;
 *         a private copy (the receiver's skb), never shared memory
 * @hlen: bytes readable at @frame (at most @len)
 * @len: the whole frame's length
 * @m: the record's offload metadata
 *
 * Checks what the receive path relies on: a checksum to fill in starts at
 * or after the transport header (past the Ethernet header, up to two VLAN
 * tags and, for IP, the IP header) and lies within @hlen; a GSO record
 * says it is TCP over the frame's IP version, or UDP, with the transport
 * header where csum_start says, a checksum offset matching it, and at most
 * IVL_UDP_MAX_SEGS UDP segments.
 *
 * Return: 0 if the metadata fits the frame, -EINVAL if not.
 */
int ivl_meta_check(const u8 *frame, u32 hlen, u32 len,
		   const struct ivl_rec_meta *m);

#endif /* IVL_META_H */
