/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * ivloop ring: single-producer, single-consumer, variable-length records in
 * the shared region (layout in ivl_abi.h).
 *
 * This file and ivl_ring.c use no netdev or PCI types so they also build in
 * user space (see tests/ring/), the way tools/virtio/ tests virtio_ring.
 *
 * The peer may write anything anywhere at any time.  Every index and every
 * record header is read once with READ_ONCE/virt_load_acquire into a local,
 * checked, and only the local is used.  A check that fails returns -EBADMSG
 * and the caller drops the peer to the lower path.
 *
 * The types are documented below; each function is documented (kernel-doc)
 * at its definition in ivl_ring.c, next to the barriers it describes.
 */
#ifndef IVL_RING_H
#define IVL_RING_H

#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/errno.h>
#else
#include "ivl_user.h"
#endif
#include "ivl_abi.h"

/**
 * struct ivl_rec_meta - offload metadata carried by a record
 * @flags: IVL_REC_CSUM_PARTIAL (checksum still to be filled in) and
 *         IVL_REC_CSUM_VALID (checksum already verified); a record
 *         carries no other bit
 * @gso_type: IVL_GSO_NONE, or IVL_GSO_TCPV4, IVL_GSO_TCPV6 (either may
 *            have IVL_GSO_ECN or'ed in) or IVL_GSO_UDP_L4
 * @gso_size: MSS of a GSO frame; not 0 when @gso_type is not IVL_GSO_NONE
 * @csum_start: with IVL_REC_CSUM_PARTIAL, where checksumming starts, in
 *              bytes from the frame's start
 * @csum_offset: with IVL_REC_CSUM_PARTIAL, where the 16-bit checksum goes,
 *               in bytes from @csum_start
 *
 * Host byte order; the record header holds the same fields little-endian.
 * On the producer side the caller fills it for ivl_ring_commit(), which
 * keeps only the two checksum bits of @flags and checks nothing else.  On
 * the consumer side ivl_ring_peek() fills the one in &struct ivl_rec from
 * its checked copy of the header: no unknown or pad flag, a GSO type and
 * size that go together, and with IVL_REC_CSUM_PARTIAL a checksum field
 * inside the frame.  Whether the metadata fits the frame's headers is
 * ivl_meta_check()'s question, not the ring's.
 */
struct ivl_rec_meta {
	u16 flags;
	u16 gso_type;
	u16 gso_size;
	u16 csum_start;
	u16 csum_offset;
};

/**
 * struct ivl_ring - a producer's or consumer's private view of one ring
 * @ctrl: the ring's control block in the shared region (both sides): shared
 *        and untrusted, the peer may rewrite any of it at any time
 * @data: the ring's @size data bytes, right after @ctrl (both sides):
 *        shared and untrusted
 * @size: data bytes in the ring, a power of two (both sides)
 * @mask: @size - 1, to turn an index into an offset (both sides)
 * @prod: producer side: the next byte to publish.  Private, and the truth:
 *        the shared prod only mirrors it.  Stays 0 on a consumer's view.
 * @cons: consumer side: the next byte to consume.  Private, and the truth:
 *        the shared cons only mirrors it.  Stays 0 on a producer's view.
 *        ivl_ring_pending() reads it beside the other consumer calls.
 * @other: both sides: the last peer index seen and found sane, the
 *         consumer's cons on a producer's view, the producer's prod on a
 *         consumer's view (the attach sets it to its own start index)
 * @pending: producer side: bytes reserved by ivl_ring_reserve() and not
 *           yet committed, 0 when there is no reservation
 * @broken: both sides: the peer broke the ring (a bad index or record);
 *          sticky until the next attach
 *
 * One side's view: an attach (ivl_ring_attach_producer(),
 * ivl_ring_restart_producer() or ivl_ring_attach_consumer()) sets every
 * field and decides the side; only the ring functions write the fields
 * after that, serialised by the caller as ivl_ring.c documents for each.
 * The caller may read them under the same serialisation.  The two indices
 * the sides share live in @ctrl, written by one side each; @prod, @cons
 * and @other are the private copies each side trusts instead.
 */
struct ivl_ring {
	struct ivl_ring_ctrl *ctrl;
	u8 *data;
	u32 size;
	u32 mask;
	u32 prod;
	u32 cons;
	u32 other;
	u32 pending;
	bool broken;
};

/**
 * struct ivl_rec - a record handed to the consumer by ivl_ring_peek()
 * @data: the frame's first byte, inside the ring's shared data area: the
 *        peer may rewrite it while the caller reads it
 * @len: frame bytes at @data, at most IVL_MAX_FRAME, all published and
 *       before the ring's end
 * @meta: the record's offload metadata, as checked by ivl_ring_peek()
 * @span: bytes the record occupies in the ring, header and alignment
 *        padding included (ivl_rec_span() of @len)
 *
 * Consumer side: ivl_ring_peek() fills every field from its local, checked
 * copy of the record header; the caller only reads them, copies the frame
 * at @data once and uses only the copy, then hands the record back to
 * ivl_ring_consume(), which releases @span bytes.
 */
struct ivl_rec {
	const u8 *data;
	u32 len;
	struct ivl_rec_meta meta;
	u32 span;
};

/**
 * ivl_rec_span() - bytes a record of @len frame bytes occupies in a ring
 * @len: frame bytes
 *
 * The record header and @len, rounded up to IVL_REC_ALIGN, which keeps
 * every record header aligned.
 *
 * Context: Any context.
 * Return: the record's span, a multiple of IVL_REC_ALIGN.
 */
static inline u32 ivl_rec_span(u32 len)
{
	return (u32)((sizeof(struct ivl_rec_hdr) + len + IVL_REC_ALIGN - 1) &
		     ~(IVL_REC_ALIGN - 1));
}

/*
 * Attach (kernel-doc at the definitions in ivl_ring.c): make @r the
 * producer's or the consumer's view of the ring at @base.  Nothing else
 * may use @r meanwhile.
 */
int ivl_ring_attach_producer(struct ivl_ring *r, void *base, u32 size);
int ivl_ring_restart_producer(struct ivl_ring *r, void *base, u32 size);
int ivl_ring_attach_consumer(struct ivl_ring *r, void *base, u32 size);

/*
 * Producer (kernel-doc at the definitions in ivl_ring.c): reserve, write
 * the frame, commit; after one or more commits, need_kick says whether to
 * ring the doorbell.  The caller serialises all producer calls on a ring.
 */
void *ivl_ring_reserve(struct ivl_ring *r, u32 len);
void ivl_ring_commit(struct ivl_ring *r, u32 len, const struct ivl_rec_meta *meta);
bool ivl_ring_need_kick(struct ivl_ring *r);
bool ivl_ring_has_room(struct ivl_ring *r, u32 len);
int ivl_ring_check_producer(struct ivl_ring *r);

/*
 * Consumer (kernel-doc at the definitions in ivl_ring.c): peek, copy the
 * frame once, consume; enable_kick before going idle, disable_kick while
 * polling.  The caller serialises all consumer calls on a ring; only
 * ivl_ring_pending() may run beside them.
 */
int ivl_ring_peek(struct ivl_ring *r, struct ivl_rec *rec);
void ivl_ring_consume(struct ivl_ring *r, const struct ivl_rec *rec);
bool ivl_ring_enable_kick(struct ivl_ring *r);
void ivl_ring_disable_kick(struct ivl_ring *r);
bool ivl_ring_empty(struct ivl_ring *r);
bool ivl_ring_pending(const struct ivl_ring *r);

#endif /* IVL_RING_H */
