// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * ivloop ring: single-producer, single-consumer, variable-length records in
 * the shared region.  ivl_ring.h declares the API and documents its types;
 * each function is documented (kernel-doc) at its definition below, and
 * ivl_abi.h has the layout.
 *
 * Trust model: each side keeps its own index (r->prod or r->cons) in private
 * memory and treats it as the truth.  The peer's index and every record
 * header are read once into a local and checked before use, so a peer that
 * writes garbage, or rewrites the ring while we look at it, can make us
 * drop frames or declare the ring broken, but never make us touch memory
 * outside the ring's data area or loop.
 *
 * Locking: none inside.  The caller serialises all producer calls on a ring
 * (e.g. the netdev tx lock) and all consumer calls on a ring (NAPI); only
 * ivl_ring_pending() may run beside the consumer calls.  None sleeps.
 */
#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/errno.h>
#include <linux/bug.h>
#include <linux/compiler.h>
#include <linux/log2.h>
#include <asm/barrier.h>
#include <asm/byteorder.h>
#endif
#include "ivl_ring.h"

#define IVL_REC_HDR_SIZE	((u32)sizeof(struct ivl_rec_hdr))

/*
 * The peer's index is sane when it is aligned and the distance between the
 * two indices (mod 2^32) is no more than the ring holds.
 */
static bool ivl_ring_index_ok(const struct ivl_ring *r, u32 prod, u32 cons)
{
	return (u32)(prod - cons) <= r->size &&
	       ((prod | cons) & (IVL_REC_ALIGN - 1)) == 0;
}

static struct ivl_rec_hdr *ivl_ring_hdr_at(const struct ivl_ring *r, u32 idx)
{
	/* idx is a multiple of IVL_REC_ALIGN, so the header fits before end */
	return (struct ivl_rec_hdr *)(r->data + (idx & r->mask));
}

static int ivl_ring_attach(struct ivl_ring *r, void *base, u32 size)
{
	if (!is_power_of_2(size) || size < IVL_RING_MIN_SIZE ||
	    size > IVL_RING_MAX_SIZE)
		return -EINVAL;
	/* record headers are read with naturally aligned 16/32-bit loads */
	if (((unsigned long)base & (IVL_REC_ALIGN - 1)) != 0)
		return -EINVAL;

	r->ctrl = base;
	r->data = (u8 *)base + IVL_RING_CTRL_SIZE;
	r->size = size;
	r->mask = size - 1;
	r->prod = 0;
	r->cons = 0;
	r->other = 0;
	r->pending = 0;
	r->broken = false;
	return 0;
}

/**
 * ivl_ring_attach_producer() - attach to a ring as its producer
 * @r: the view to set up
 * @base: the ring's struct ivl_ring_ctrl in the shared region, aligned to
 *        IVL_REC_ALIGN; the data bytes follow it
 * @size: data bytes, a power of two within IVL_RING_MIN_SIZE and
 *        IVL_RING_MAX_SIZE
 *
 * Starts from the shared prod, read once and kept in @r->prod: the server
 * zeroed it on join, or a previous instance of this driver left it there.
 * Does not write shared memory.  Clears @r->broken and any reservation.
 *
 * Context: Any context; does not sleep.  No other call on @r may run
 * meanwhile (on a consumer's view not even ivl_ring_pending()); the peer
 * may.
 *
 * Return: 0 on success; -EINVAL if @size or @base does not fit (@r is left
 * as it was); -EBADMSG if the shared prod is not a multiple of
 * IVL_REC_ALIGN (the ring is broken).
 */
int ivl_ring_attach_producer(struct ivl_ring *r, void *base, u32 size)
{
	int err = ivl_ring_attach(r, base, size);

	if (err)
		return err;
	/*
	 * The shared prod is ours to write but the server zeroed it, or a
	 * previous instance of this driver left it: start from it, so a
	 * consumer that kept its cons still agrees with us.
	 */
	r->prod = le32_to_cpu(READ_ONCE(r->ctrl->prod));
	r->other = r->prod;
	if (r->prod & (IVL_REC_ALIGN - 1))
		return -EBADMSG;
	return 0;
}

/**
 * ivl_ring_restart_producer() - attach as producer to a restarted ring
 * @r: the view to set up
 * @base: the ring's struct ivl_ring_ctrl in the shared region, aligned to
 *        IVL_REC_ALIGN; the data bytes follow it
 * @size: data bytes, a power of two within IVL_RING_MIN_SIZE and
 *        IVL_RING_MAX_SIZE
 *
 * The producer's attach to a ring whose consumer started afresh (the
 * server zeroed the ring when the peer rejoined) while we may have
 * published into it.  Starts at the consumer's cons, read once, and
 * publishes that as prod (store-release), so what we wrote before is
 * never parsed: the ring starts empty.  The one attach that writes shared
 * memory.  Clears @r->broken and any reservation.
 *
 * Context: Any context; does not sleep.  No other call on @r may run
 * meanwhile (on a consumer's view not even ivl_ring_pending()); the peer
 * may.
 *
 * Return: 0 on success; -EINVAL if @size or @base does not fit (@r is left
 * as it was); -EBADMSG if the shared cons is not a multiple of
 * IVL_REC_ALIGN (the ring is broken; prod is not written).
 */
int ivl_ring_restart_producer(struct ivl_ring *r, void *base, u32 size)
{
	int err = ivl_ring_attach(r, base, size);
	u32 cons;

	if (err)
		return err;
	cons = le32_to_cpu(READ_ONCE(r->ctrl->cons));
	if (cons & (IVL_REC_ALIGN - 1))
		return -EBADMSG;
	r->prod = cons;
	r->other = cons;
	/* nothing new to publish: the release only keeps prod one store */
	virt_store_release(&r->ctrl->prod, cpu_to_le32(cons));
	return 0;
}

/**
 * ivl_ring_attach_consumer() - attach to a ring as its consumer
 * @r: the view to set up
 * @base: the ring's struct ivl_ring_ctrl in the shared region, aligned to
 *        IVL_REC_ALIGN; the data bytes follow it
 * @size: data bytes, a power of two within IVL_RING_MIN_SIZE and
 *        IVL_RING_MAX_SIZE
 *
 * Starts from the shared cons, read once and kept in @r->cons (the server
 * zeroed it on join).  Does not write shared memory, so need_kick stays as
 * it is: a zeroed ring's is clear, and the producer rings only after
 * ivl_ring_enable_kick().  Clears @r->broken.
 *
 * Context: Any context; does not sleep.  No other call on @r may run
 * meanwhile (on a consumer's view not even ivl_ring_pending()); the peer
 * may.
 *
 * Return: 0 on success; -EINVAL if @size or @base does not fit (@r is left
 * as it was); -EBADMSG if the shared cons is not a multiple of
 * IVL_REC_ALIGN (the ring is broken).
 */
int ivl_ring_attach_consumer(struct ivl_ring *r, void *base, u32 size)
{
	int err = ivl_ring_attach(r, base, size);

	if (err)
		return err;
	r->cons = le32_to_cpu(READ_ONCE(r->ctrl->cons));
	r->other = r->cons;
	if (r->cons & (IVL_REC_ALIGN - 1))
		return -EBADMSG;
	return 0;
}

/*
 * Producer: read the consumer's cons once and check it against our private
 * prod.  On success *free is the number of bytes we may write.
 */
static bool ivl_ring_prod_free(struct ivl_ring *r, u32 *free)
{
	u32 cons;

	if (unlikely(r->broken))
		return false;
	/*
	 * Acquire pairs with the store-release of cons in
	 * ivl_ring_consume(): the consumer's reads of the bytes it released
	 * happen before our writes into them.
	 */
	cons = le32_to_cpu(virt_load_acquire(&r->ctrl->cons));
	if (unlikely(!ivl_ring_index_ok(r, r->prod, cons))) {
		r->broken = true;
		return false;
	}
	r->other = cons;
	*free = r->size - (u32)(r->prod - cons);
	return true;
}

/*
 * Bytes to skip with a pad before a record of @span may start at @prod, or
 * 0 when it fits before the ring's end.
 */
static u32 ivl_ring_pad_for(const struct ivl_ring *r, u32 prod, u32 span)
{
	u32 tail = r->size - (prod & r->mask);

	return span <= tail ? 0 : tail;
}

/**
 * ivl_ring_has_room() - would a reserve of @len succeed now?
 * @r: a producer's view
 * @len: frame bytes
 *
 * Counts any pad ivl_ring_reserve() would need before the record.  Reads
 * the consumer's cons once, with load-acquire, and checks it as
 * ivl_ring_reserve() does: a cons out of range or misaligned breaks the
 * ring, sticky until the next attach.  Updates @r->other.  Writes no
 * shared memory.
 *
 * Context: Any context; does not sleep.  Producer side: the caller
 * serialises all producer calls on @r (e.g. with the peer's TX queue
 * lock); the peer's consumer runs meanwhile.
 *
 * Return: true if ivl_ring_reserve() of @len would succeed now; false if
 * the ring is too full, @len > IVL_MAX_FRAME, or the consumer broke the
 * ring (ivl_ring_check_producer() tells them apart).
 */
bool ivl_ring_has_room(struct ivl_ring *r, u32 len)
{
	u32 free, span;

	if (len > IVL_MAX_FRAME || !ivl_ring_prod_free(r, &free))
		return false;
	span = ivl_rec_span(len);
	return ivl_ring_pad_for(r, r->prod, span) + span <= free;
}

/**
 * ivl_ring_reserve() - reserve room for a record of @len frame bytes
 * @r: a producer's view
 * @len: frame bytes the caller will write
 *
 * The caller writes the frame where this returns, then publishes it with
 * ivl_ring_commit(); abandoning the reservation instead is harmless, and
 * the next reserve ends it.  When the record does not fit before the
 * ring's end, writes a pad record over the tail and places the record at
 * the ring's start; the pad becomes visible with the next commit, together
 * with the record that follows it.  Nothing is visible to the consumer
 * before a commit.
 *
 * Reads the consumer's cons once, with load-acquire (the consumer's reads
 * of the bytes it released happen before our writes into them), and
 * checks it: a cons out of range or misaligned breaks the ring, sticky
 * until the next attach.  Updates @r->other.
 *
 * Context: Any context; does not sleep.  Producer side: the caller
 * serialises all producer calls on @r (e.g. with the peer's TX queue
 * lock); the peer's consumer runs meanwhile.
 *
 * Return: where @len frame bytes may be written contiguously, inside the
 * ring's shared data area; NULL (a plain NULL, never an ERR_PTR()) when the
 * ring is full, when @len > IVL_MAX_FRAME, or when the consumer broke the
 * ring.  ivl_ring_check_producer() tells a broken ring from the others.
 */
void *ivl_ring_reserve(struct ivl_ring *r, u32 len)
{
	struct ivl_rec_hdr *pad;
	u32 free, span, skip;

	r->pending = 0;
	if (len > IVL_MAX_FRAME || !ivl_ring_prod_free(r, &free))
		return NULL;
	span = ivl_rec_span(len);
	skip = ivl_ring_pad_for(r, r->prod, span);
	if (skip + span > free)
		return NULL;

	if (skip) {
		/*
		 * The record does not fit before the ring's end: fill the
		 * tail with a pad record.  It becomes visible with the next
		 * commit's store-release of prod, together with the record
		 * that follows it; if the caller abandons this reservation
		 * the pad simply waits for the next commit.
		 */
		pad = ivl_ring_hdr_at(r, r->prod);
		WRITE_ONCE(pad->len, cpu_to_le32(skip - IVL_REC_HDR_SIZE));
		WRITE_ONCE(pad->flags, cpu_to_le16(IVL_REC_PAD));
		WRITE_ONCE(pad->gso_type, cpu_to_le16(IVL_GSO_NONE));
		WRITE_ONCE(pad->gso_size, 0);
		WRITE_ONCE(pad->csum_start, 0);
		WRITE_ONCE(pad->csum_offset, 0);
		WRITE_ONCE(pad->reserved, 0);
		r->prod += skip;
	}
	r->pending = span;
	return (u8 *)ivl_ring_hdr_at(r, r->prod) + IVL_REC_HDR_SIZE;
}

/**
 * ivl_ring_commit() - write a reserved record's header and publish it
 * @r: a producer's view holding a reservation
 * @len: frame bytes the caller wrote; must not exceed the reserved length
 * @meta: the frame's offload metadata, or NULL for none; only
 *        IVL_REC_CSUM_PARTIAL and IVL_REC_CSUM_VALID are kept of its flags
 *
 * Writes the record header, then publishes the record with a store-release
 * of prod: the frame bytes the caller wrote, any pad the reservation wrote
 * and this header are visible before the new prod.  Ends the reservation.
 * Does not check @meta against the frame: the consumer applies
 * ivl_meta_check(), so the caller should too.  Several commits may precede
 * one ivl_ring_need_kick() (xmit_more).
 *
 * A record longer than the reservation (or with none, or @len >
 * IVL_MAX_FRAME) would overrun into bytes that are not free: it warns once
 * (WARN_ON_ONCE()) and publishes nothing.
 *
 * Context: Any context; does not sleep.  Producer side: the caller
 * serialises all producer calls on @r (e.g. with the peer's TX queue
 * lock); the peer's consumer runs meanwhile.
 */
void ivl_ring_commit(struct ivl_ring *r, u32 len,
		     const struct ivl_rec_meta *meta)
{
	struct ivl_rec_hdr *hdr;
	u32 span = ivl_rec_span(len);
	u16 flags = 0;

	/* a longer record than reserved would overrun into unfree bytes */
	if (WARN_ON_ONCE(len > IVL_MAX_FRAME || span > r->pending))
		return;

	if (meta)
		flags = meta->flags & (IVL_REC_CSUM_PARTIAL |
				       IVL_REC_CSUM_VALID);
	hdr = ivl_ring_hdr_at(r, r->prod);
	WRITE_ONCE(hdr->len, cpu_to_le32(len));
	WRITE_ONCE(hdr->flags, cpu_to_le16(flags));
	WRITE_ONCE(hdr->gso_type, cpu_to_le16(meta ? meta->gso_type : 0));
	WRITE_ONCE(hdr->gso_size, cpu_to_le16(meta ? meta->gso_size : 0));
	WRITE_ONCE(hdr->csum_start, cpu_to_le16(meta ? meta->csum_start : 0));
	WRITE_ONCE(hdr->csum_offset,
		   cpu_to_le16(meta ? meta->csum_offset : 0));
	WRITE_ONCE(hdr->reserved, 0);
	r->prod += span;
	r->pending = 0;
	/*
	 * Release: the frame bytes the caller wrote, any pad header and this
	 * header are visible before the new prod.  Pairs with the
	 * load-acquire of prod in ivl_ring_peek().
	 */
	virt_store_release(&r->ctrl->prod, cpu_to_le32(r->prod));
}

/**
 * ivl_ring_need_kick() - after commits, should the producer ring?
 * @r: a producer's view
 *
 * Called after one or more ivl_ring_commit()s.  Issues a full barrier
 * that orders the prod store (in the commits) before the need_kick load;
 * ivl_ring_enable_kick() has the matching one, so either the consumer
 * sees the new prod and keeps polling, or this sees need_kick set: no
 * wakeup is lost.
 *
 * Context: Any context; does not sleep.  Producer side: the caller
 * serialises all producer calls on @r (e.g. with the peer's TX queue
 * lock); the peer's consumer runs meanwhile.
 *
 * Return: true if the consumer asked for a kick (need_kick not 0): ring
 * the doorbell.  False if it is polling.
 */
bool ivl_ring_need_kick(struct ivl_ring *r)
{
	/*
	 * Full barrier: our store of prod (in ivl_ring_commit()) is ordered
	 * before our load of need_kick.  Pairs with the virt_mb() in
	 * ivl_ring_enable_kick(), which orders the consumer's store of
	 * need_kick before its load of prod.  Store-buffering with a full
	 * barrier on both sides: either the consumer sees our prod and
	 * keeps polling, or we see need_kick set and ring the doorbell.  A
	 * release or acquire alone would allow both loads to miss both
	 * stores, which is the lost wakeup.
	 */
	virt_mb();
	return READ_ONCE(r->ctrl->need_kick) != 0;
}

/**
 * ivl_ring_check_producer() - did the consumer break the ring?
 * @r: a producer's view
 *
 * ivl_ring_reserve() and ivl_ring_has_room() return NULL/false both when
 * the ring is full (or @len > IVL_MAX_FRAME) and when the consumer broke
 * it (cons out of range or misaligned); this tells the two apart.  Reads
 * and checks cons as they do (once, with load-acquire); while the ring is
 * sane it updates @r->other to the cons just read.
 *
 * Context: Any context; does not sleep.  Producer side: the caller
 * serialises all producer calls on @r (e.g. with the peer's TX queue
 * lock); the peer's consumer runs meanwhile.
 *
 * Return: 0 while the ring is sane (a NULL/false meant full, or @len >
 * IVL_MAX_FRAME); -EBADMSG once the consumer broke it, sticky until the
 * next attach.
 */
int ivl_ring_check_producer(struct ivl_ring *r)
{
	u32 free;

	return ivl_ring_prod_free(r, &free) ? 0 : -EBADMSG;
}

/*
 * Consumer: read the producer's prod once and check it against our private
 * cons.  Returns the number of bytes published and not yet consumed, or
 * -EBADMSG.
 */
static int ivl_ring_cons_avail(struct ivl_ring *r, u32 *avail)
{
	u32 prod;

	if (unlikely(r->broken))
		return -EBADMSG;
	/*
	 * Acquire pairs with the store-release of prod in ivl_ring_commit():
	 * the record headers and frame bytes below prod are visible before
	 * we read them.
	 */
	prod = le32_to_cpu(virt_load_acquire(&r->ctrl->prod));
	if (unlikely(!ivl_ring_index_ok(r, prod, r->cons))) {
		r->broken = true;
		return -EBADMSG;
	}
	r->other = prod;
	*avail = (u32)(prod - r->cons);
	return 0;
}

static bool ivl_ring_gso_ok(u16 gso_type, u16 gso_size)
{
	switch (gso_type & ~IVL_GSO_ECN) {
	case IVL_GSO_NONE:
		/* ECN without a segmentation type means nothing */
		return gso_type == IVL_GSO_NONE;
	case IVL_GSO_TCPV4:
	case IVL_GSO_TCPV6:
		return gso_size != 0;
	case IVL_GSO_UDP_L4:
		return gso_size != 0 && !(gso_type & IVL_GSO_ECN);
	default:
		return false;
	}
}

/*
 * Check a record header copied out of the ring at offset @off with @avail
 * bytes published from there.  Every value is the local copy: the peer may
 * have rewritten the ring since.
 */
static bool ivl_ring_rec_ok(const struct ivl_ring *r, u32 off, u32 avail,
			    u32 len, u16 flags, u16 gso_type, u16 gso_size,
			    u16 csum_start, u16 csum_offset)
{
	u32 tail = r->size - off;
	u32 span;

	if (flags & ~IVL_REC_KNOWN_FLAGS)
		return false;
	if (flags & IVL_REC_PAD) {
		/*
		 * A pad runs exactly to the ring's end.  One at offset 0
		 * would cover the whole ring and is never written; refusing
		 * it bounds ivl_ring_peek() to one pad per call.
		 */
		return flags == IVL_REC_PAD && off != 0 &&
		       len == tail - IVL_REC_HDR_SIZE && tail <= avail;
	}
	if (len > IVL_MAX_FRAME)
		return false;
	span = ivl_rec_span(len);
	if (span > avail || span > tail)
		return false;
	if (!ivl_ring_gso_ok(gso_type, gso_size))
		return false;
	/* the 16-bit checksum field to fill in lies inside the frame */
	if ((flags & IVL_REC_CSUM_PARTIAL) &&
	    (u32)csum_start + csum_offset + sizeof(u16) > len)
		return false;
	return true;
}

/**
 * ivl_ring_peek() - look at the next record without consuming it
 * @r: a consumer's view
 * @rec: filled with the record on success
 *
 * Reads the producer's prod once, with load-acquire (the records below it
 * are then visible), and checks it; then copies the next record header
 * once into locals and checks those: known flags, a length within
 * IVL_MAX_FRAME, a record all published and not crossing the ring's end,
 * a GSO type and size that go together and, with IVL_REC_CSUM_PARTIAL, a
 * checksum field inside the frame.  Only the checked copies fill @rec.
 * Pad records are skipped and released (store-release of cons)
 * internally.  Until ivl_ring_consume(), the next peek looks at the same
 * record again.
 *
 * The frame at @rec->data is in shared memory that the peer may rewrite
 * while the caller copies it: copy it once, then use only the copy.  A
 * rewrite can only corrupt that frame (checksums catch it), never the
 * caller's memory.
 *
 * Context: Any context; does not sleep.  Consumer side: the caller
 * serialises all consumer calls on @r (e.g. by running them in NAPI); only
 * ivl_ring_pending() may run beside this one, and the peer's producer runs
 * meanwhile.
 *
 * Return: 0 with @rec filled; -EAGAIN when there is no record to read;
 * -EBADMSG when the producer broke the ring (a bad index, length, flags or
 * metadata, or a record crossing the ring's end), sticky until the next
 * attach.
 */
int ivl_ring_peek(struct ivl_ring *r, struct ivl_rec *rec)
{
	const struct ivl_rec_hdr *hdr;
	u16 flags, gso_type, gso_size, csum_start, csum_offset;
	u32 avail, off, len;
	int pass, err;

	err = ivl_ring_cons_avail(r, &avail);
	if (err)
		return err;

	/* at most one pad then one record: see ivl_ring_rec_ok() */
	for (pass = 0; pass < 2; pass++) {
		if (!avail)
			return -EAGAIN;
		/* avail >= IVL_REC_ALIGN: the whole header is published */
		off = r->cons & r->mask;
		hdr = ivl_ring_hdr_at(r, r->cons);
		len = le32_to_cpu(READ_ONCE(hdr->len));
		flags = le16_to_cpu(READ_ONCE(hdr->flags));
		gso_type = le16_to_cpu(READ_ONCE(hdr->gso_type));
		gso_size = le16_to_cpu(READ_ONCE(hdr->gso_size));
		csum_start = le16_to_cpu(READ_ONCE(hdr->csum_start));
		csum_offset = le16_to_cpu(READ_ONCE(hdr->csum_offset));

		if (!ivl_ring_rec_ok(r, off, avail, len, flags, gso_type,
				     gso_size, csum_start, csum_offset)) {
			r->broken = true;
			return -EBADMSG;
		}

		if (flags & IVL_REC_PAD) {
			/* WRITE_ONCE: ivl_ring_pending() reads it beside us */
			WRITE_ONCE(r->cons, r->cons + len + IVL_REC_HDR_SIZE);
			avail -= len + IVL_REC_HDR_SIZE;
			/*
			 * Release the pad now rather than with the next
			 * record, so a producer waiting for room is not held
			 * up by a pad with nothing behind it yet.  Nothing
			 * of the pad was read but its header, above.
			 */
			virt_store_release(&r->ctrl->cons, cpu_to_le32(r->cons));
			continue;
		}

		rec->data = (const u8 *)hdr + IVL_REC_HDR_SIZE;
		rec->len = len;
		rec->span = ivl_rec_span(len);
		rec->meta.flags = flags;
		rec->meta.gso_type = gso_type;
		rec->meta.gso_size = gso_size;
		rec->meta.csum_start = csum_start;
		rec->meta.csum_offset = csum_offset;
		return 0;
	}
	/* a pad right after a pad: caught by the off != 0 rule above */
	r->broken = true;
	return -EBADMSG;
}

/**
 * ivl_ring_consume() - release the record ivl_ring_peek() returned
 * @r: a consumer's view
 * @rec: the record the last successful ivl_ring_peek() on @r filled
 *
 * Call it only after the copy, and once per record: advances cons past
 * @rec->span bytes and publishes it with a store-release, so our reads of
 * the record complete before the producer can see the space free and
 * overwrite it.
 *
 * Context: Any context; does not sleep.  Consumer side: the caller
 * serialises all consumer calls on @r (e.g. by running them in NAPI); only
 * ivl_ring_pending() may run beside this one, and the peer's producer runs
 * meanwhile.
 */
void ivl_ring_consume(struct ivl_ring *r, const struct ivl_rec *rec)
{
	/* WRITE_ONCE: ivl_ring_pending() reads it beside us */
	WRITE_ONCE(r->cons, r->cons + rec->span);
	/*
	 * Release: our reads of the record (the caller's copy) complete
	 * before the producer can see the space free and overwrite it.
	 * Pairs with the load-acquire of cons in ivl_ring_prod_free().
	 */
	virt_store_release(&r->ctrl->cons, cpu_to_le32(r->cons));
}

/**
 * ivl_ring_empty() - has the consumer nothing to peek?
 * @r: a consumer's view
 *
 * Reads and checks prod as ivl_ring_peek() does (once, with load-acquire;
 * a bad one breaks the ring, sticky until the next attach).  A broken ring
 * is not empty, so the caller peeks and sees -EBADMSG.  A published pad
 * with nothing behind it counts as not empty, though the peek then
 * returns -EAGAIN.
 *
 * Context: Any context; does not sleep.  Consumer side: the caller
 * serialises all consumer calls on @r (e.g. by running them in NAPI); only
 * ivl_ring_pending() may run beside this one, and the peer's producer runs
 * meanwhile.
 *
 * Return: true when the producer published nothing beyond our cons; false
 * otherwise, and when the ring is broken.
 */
bool ivl_ring_empty(struct ivl_ring *r)
{
	u32 avail;

	return ivl_ring_cons_avail(r, &avail) == 0 && avail == 0;
}

/**
 * ivl_ring_pending() - lock-free hint that the producer published something
 * @r: a consumer's view
 *
 * Compares the shared prod, read once without a barrier, with our cons.
 * Writes nothing and checks nothing: whatever prod says, the next
 * ivl_ring_peek() checks it before a byte is read.
 *
 * Context: Any context; does not sleep.  The one consumer call that may
 * run beside the other consumer calls on @r (which the caller serialises),
 * e.g. in a poller deciding whether to schedule NAPI; @r must stay
 * attached meanwhile.
 *
 * Return: true if prod differs from our cons (a hint: also when prod is
 * garbage); false if they are equal.
 */
bool ivl_ring_pending(const struct ivl_ring *r)
{
	/*
	 * A hint, and the only consumer call that may race with the others:
	 * it writes nothing, and whatever prod says, ivl_ring_peek() checks
	 * it before a byte is read.
	 */
	return le32_to_cpu(READ_ONCE(r->ctrl->prod)) != READ_ONCE(r->cons);
}

/**
 * ivl_ring_enable_kick() - ask for a kick before the consumer goes idle
 * @r: a consumer's view
 *
 * Sets need_kick, issues a full barrier, then reads and checks prod as
 * ivl_ring_empty() does.  The barrier orders the need_kick store before the
 * prod load; ivl_ring_need_kick() has the matching one, so either the
 * producer sees need_kick set and rings, or this sees its records: no
 * wakeup is lost.
 *
 * Context: Any context; does not sleep.  Consumer side: the caller
 * serialises all consumer calls on @r (e.g. by running them in NAPI); only
 * ivl_ring_pending() may run beside this one, and the peer's producer runs
 * meanwhile.
 *
 * Return: true when records arrived meanwhile, or the ring is broken: the
 * caller keeps polling (and its next peek sees -EBADMSG).  False when the
 * ring is empty: the producer will ring.
 */
bool ivl_ring_enable_kick(struct ivl_ring *r)
{
	WRITE_ONCE(r->ctrl->need_kick, cpu_to_le32(1));
	/*
	 * Full barrier: our store of need_kick is ordered before our load
	 * of prod below.  Pairs with the virt_mb() in ivl_ring_need_kick();
	 * see there why this cannot lose a wakeup.
	 */
	virt_mb();
	return !ivl_ring_empty(r);
}

/**
 * ivl_ring_disable_kick() - tell the producer not to ring while we poll
 * @r: a consumer's view
 *
 * Clears need_kick, with no barrier: a producer that still sees it set only
 * rings one doorbell too many, which costs an interrupt, not a frame.
 *
 * Context: Any context; does not sleep.  Consumer side: the caller
 * serialises all consumer calls on @r (e.g. by running them in NAPI); only
 * ivl_ring_pending() may run beside this one, and the peer's producer runs
 * meanwhile.
 */
void ivl_ring_disable_kick(struct ivl_ring *r)
{
	/*
	 * No barrier: a producer that still sees need_kick set only rings
	 * one doorbell too many, which costs an interrupt, not a frame.
	 */
	WRITE_ONCE(r->ctrl->need_kick, 0);
}
