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

/* Offload metadata carried by a record (host byte order). */
struct ivl_rec_meta {
	u16 flags;		/* IVL_REC_CSUM_PARTIAL | IVL_REC_CSUM_VALID */
	u16 gso_type;		/* IVL_GSO_* */
	u16 gso_size;
	u16 csum_start;
	u16 csum_offset;
};

/* A producer's or consumer's private view of one ring. */
struct ivl_ring {
	struct ivl_ring_ctrl *ctrl;	/* shared, untrusted */
	u8 *data;			/* shared, untrusted, @size bytes */
	u32 size;			/* power of two */
	u32 mask;
	u32 prod;		/* producer: next byte to publish (private) */
	u32 cons;		/* consumer: next byte to consume (private) */
	u32 other;		/* last peer index seen (cons or prod) */
	u32 pending;		/* producer: bytes reserved, not yet committed */
	bool broken;		/* the peer broke the ring; sticky */
};

/* A record handed to the consumer: @data points into the ring. */
struct ivl_rec {
	const u8 *data;
	u32 len;
	struct ivl_rec_meta meta;
	u32 span;		/* bytes the record occupies in the ring */
};

static inline u32 ivl_rec_span(u32 len)
{
	return (u32)((sizeof(struct ivl_rec_hdr) + len + IVL_REC_ALIGN - 1) &
		     ~(IVL_REC_ALIGN - 1));
}

/*
 * Attach to ring memory.  @base points at the struct ivl_ring_ctrl; the data
 * follows it.  @size must be a power of two within IVL_RING_{MIN,MAX}_SIZE.
 * Does not write shared memory.  The producer starts from the shared prod,
 * the consumer from the shared cons (the server zeroed both on join).
 * ivl_ring_restart_producer() is the producer's attach to a ring whose
 * consumer started afresh while we may have published into it: it starts
 * at the consumer's cons and publishes that as prod, so what we wrote
 * before is never parsed.  Each reads the shared index once and keeps the
 * local copy.
 */
int ivl_ring_attach_producer(struct ivl_ring *r, void *base, u32 size);
int ivl_ring_restart_producer(struct ivl_ring *r, void *base, u32 size);
int ivl_ring_attach_consumer(struct ivl_ring *r, void *base, u32 size);

/*
 * Producer.  ivl_ring_reserve() returns where @len frame bytes may be
 * written contiguously, or NULL when the ring is full (or ERR-free NULL when
 * @len > IVL_MAX_FRAME).  It may write a pad record.  ivl_ring_commit()
 * writes the record header and publishes it (store-release on prod); @len
 * must not exceed the reserved length, @meta may be NULL (no offloads).
 * Several commits may precede one ivl_ring_need_kick() (xmit_more).
 * ivl_ring_need_kick() is called after commits: it orders the prod store
 * before the need_kick load (full barrier) and says whether to ring the
 * doorbell.  ivl_ring_has_room() says whether a reserve of @len (including
 * any pad it would need) would succeed now.
 *
 * reserve() and has_room() also return NULL/false when the consumer broke
 * the ring (cons out of range or misaligned).  ivl_ring_check_producer()
 * tells the two apart: 0 while the ring is sane (NULL meant full, or
 * @len > IVL_MAX_FRAME), -EBADMSG once the peer broke it (sticky until
 * the next attach).
 */
void *ivl_ring_reserve(struct ivl_ring *r, u32 len);
void ivl_ring_commit(struct ivl_ring *r, u32 len, const struct ivl_rec_meta *meta);
bool ivl_ring_need_kick(struct ivl_ring *r);
bool ivl_ring_has_room(struct ivl_ring *r, u32 len);
int ivl_ring_check_producer(struct ivl_ring *r);

/*
 * Consumer.  ivl_ring_peek() returns 0 with @rec filled, -EAGAIN when empty,
 * -EBADMSG when the peer broke the ring (bad index, length, flags, or a
 * record crossing the ring's end); -EBADMSG is sticky until the next
 * attach.  Pad records are skipped (and released) internally.
 * @rec->data points into shared memory that the peer may rewrite while the
 * caller copies it: copy it once, then use only the copy.  A rewrite can
 * only corrupt that frame (checksums catch it), never the caller's memory.
 * ivl_ring_consume() releases the record (store-release on cons); call it
 * only after the copy.
 * ivl_ring_enable_kick() sets need_kick, issues a full barrier and returns
 * true when records arrived meanwhile (the caller keeps polling);
 * ivl_ring_disable_kick() clears it while polling.  ivl_ring_empty() is
 * true when the consumer has nothing to peek; a broken ring is not empty
 * (so the caller peeks and sees -EBADMSG).
 * ivl_ring_pending() is a lock-free hint that the producer published
 * something: it may run beside the other consumer calls, writes nothing,
 * and checks nothing (the next peek does).
 */
int ivl_ring_peek(struct ivl_ring *r, struct ivl_rec *rec);
void ivl_ring_consume(struct ivl_ring *r, const struct ivl_rec *rec);
bool ivl_ring_enable_kick(struct ivl_ring *r);
void ivl_ring_disable_kick(struct ivl_ring *r);
bool ivl_ring_empty(struct ivl_ring *r);
bool ivl_ring_pending(const struct ivl_ring *r);

#endif /* IVL_RING_H */
