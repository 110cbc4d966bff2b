// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * libFuzzer target for guest-driver/ivl_ring.c.
 *
 * The input is a program: a start index, then operations that interleave
 * legitimate produce/consume calls on one ring with hostile writes by the
 * peer (indices, need_kick, record headers, arbitrary bytes).  Built with
 * IVL_USER_SHARED_HOOK, every shared-memory access inside ivl_ring.c can
 * also let the peer strike in the middle of a call, as a concurrent peer
 * would.
 *
 * Checked: no access outside the ring memory (ASan: the ring is its own
 * heap block), no undefined behaviour (UBSan), no hang (libFuzzer
 * -timeout), every record peek returns lies inside the data area with
 * len <= IVL_MAX_FRAME and consistent span accounting, every pointer
 * reserve returns has room for its length, and while the peer behaved
 * (no hostile operation yet) the ring is exactly a FIFO of what was
 * produced and never reports -EBADMSG.
 *
 * Built with clang -fsanitize=fuzzer it is the fuzzer; with gcc and
 * fuzz_replay.c it replays files (tests/ring/regressions/ in `make check`).
 */
#include <stdlib.h>
#include <string.h>

#include "ivl_ring.h"

#define RING_SIZE	IVL_RING_MIN_SIZE
#define RING_BYTES	(IVL_RING_CTRL_SIZE + RING_SIZE)
#define MAX_OPS		2048
#define MAX_QUEUE	(RING_SIZE / IVL_REC_ALIGN)

#define FUZZ_ASSERT(cond)						\
	do {								\
		if (!(cond)) {						\
			fprintf(stderr, "ring_fuzz: %s:%d: %s\n",	\
				__FILE__, __LINE__, #cond);		\
			abort();					\
		}							\
	} while (0)

struct model_rec {
	u32 seq, len;
	struct ivl_rec_meta meta;
};

static struct {
	const u8 *in;
	size_t len, pos;
	u8 *mem;		/* ctrl + data, one heap block */
	struct ivl_ring_ctrl *ctrl;
	u8 *data;
	struct ivl_ring p, c;
	bool tainted;		/* the peer misbehaved: no FIFO model */
	u32 hook_budget;	/* mid-call strikes left */
	bool in_hook;
	struct model_rec q[MAX_QUEUE];
	u32 q_head, q_tail, seq;
	u8 copy[IVL_MAX_FRAME];
} fz;

static u8 get8(void)
{
	return fz.pos < fz.len ? fz.in[fz.pos++] : 0;
}

static u16 get16(void)
{
	return (u16)(get8() | get8() << 8);
}

static u32 get32(void)
{
	return (u32)get16() | (u32)get16() << 16;
}

static u8 pattern(u32 seq, u32 i)
{
	return (u8)(seq * 131u + i * 7u + (i >> 8));
}

/* A value for an index: often near a valid one, sometimes anything. */
static u32 near_index(u32 base)
{
	switch (get8() & 3) {
	case 0:
		return get32();
	case 1:
		return base + (get16() & ~(IVL_REC_ALIGN - 1));
	case 2:
		return base - (get16() & ~(IVL_REC_ALIGN - 1));
	default:
		return base + RING_SIZE + (u32)(int8_t)get8();
	}
}

/* One hostile act of the peer. */
static void strike(u8 kind)
{
	struct ivl_rec_hdr h;
	u32 off, n, i;

	fz.tainted = true;
	switch (kind % 5) {
	case 0:		/* a few arbitrary bytes anywhere in the ring */
		off = get32() % RING_BYTES;
		n = get8() % 17;
		for (i = 0; i < n && off + i < RING_BYTES; i++)
			fz.mem[off + i] = get8();
		break;
	case 1:		/* the consumer's view of prod */
		fz.ctrl->prod = near_index(fz.c.cons);
		break;
	case 2:		/* the producer's view of cons */
		fz.ctrl->cons = near_index(fz.p.prod - RING_SIZE);
		break;
	case 3:		/* a record header where the consumer looks next */
		h.len = get8() & 1 ? get32() & 0x1ffff : get32();
		h.flags = get8() & 1 ? get8() & IVL_REC_KNOWN_FLAGS : get16();
		h.gso_type = get8();
		h.gso_size = get16();
		h.csum_start = get16();
		h.csum_offset = get16();
		h.reserved = get16();
		off = (get8() & 1 ? fz.c.cons : fz.p.prod) & (RING_SIZE - 1);
		memcpy(fz.data + off, &h, sizeof(h));
		break;
	default:	/* a pad-like header at a chosen offset */
		off = (get32() % RING_SIZE) & ~(IVL_REC_ALIGN - 1);
		h = (struct ivl_rec_hdr){ .flags = IVL_REC_PAD,
			.len = RING_SIZE - off - 16 + (u32)(int8_t)get8() };
		memcpy(fz.data + off, &h, sizeof(h));
		break;
	}
}

void ivl_user_shared_hook(void)
{
	if (!fz.hook_budget || fz.in_hook || fz.pos >= fz.len)
		return;
	/* strike on roughly one access in four */
	if ((get8() & 3) != 0)
		return;
	fz.hook_budget--;
	fz.in_hook = true;
	strike(get8());
	fz.in_hook = false;
}

/* Oracle calls into the ring run without mid-call strikes. */
static bool quiet_empty(void)
{
	bool e;

	fz.in_hook = true;
	e = ivl_ring_empty(&fz.c);
	fz.in_hook = false;
	return e;
}

static int quiet_check_producer(void)
{
	int err;

	fz.in_hook = true;
	err = ivl_ring_check_producer(&fz.p);
	fz.in_hook = false;
	return err;
}

static bool data_inside(const u8 *d, u32 len)
{
	return d >= fz.data && d <= fz.data + RING_SIZE &&
	       len <= (u32)(fz.data + RING_SIZE - d);
}

static void check_invariants(void)
{
	FUZZ_ASSERT((fz.p.prod & (IVL_REC_ALIGN - 1)) == 0);
	FUZZ_ASSERT((fz.c.cons & (IVL_REC_ALIGN - 1)) == 0);
	FUZZ_ASSERT(fz.p.pending <= ivl_rec_span(IVL_MAX_FRAME));
	if (fz.tainted)
		return;
	/* an honest peer: the shared indices are the private ones */
	FUZZ_ASSERT(fz.ctrl->cons == fz.c.cons);
	FUZZ_ASSERT((u32)(fz.p.prod - fz.c.cons) <= RING_SIZE);
	FUZZ_ASSERT(!fz.p.broken && !fz.c.broken);
}

static void op_produce(void)
{
	u32 len = get16() + ((get8() & 7) == 7 ? 0x10000 : 0);
	u32 prod_before = fz.p.prod, tail, span, need, i;
	struct ivl_rec_meta meta = { 0 };
	bool room = ivl_ring_has_room(&fz.p, len);
	u8 *d = ivl_ring_reserve(&fz.p, len);

	if (!fz.tainted) {
		span = ivl_rec_span(len);
		tail = RING_SIZE - (prod_before & (RING_SIZE - 1));
		need = span <= tail ? span : tail + span;
		FUZZ_ASSERT(room == !!d);
		FUZZ_ASSERT(!!d == (len <= IVL_MAX_FRAME &&
				    need <= RING_SIZE - (prod_before -
							 fz.c.cons)));
	}
	if (!d) {
		if (!fz.tainted)
			FUZZ_ASSERT(quiet_check_producer() == 0);
		return;
	}
	FUZZ_ASSERT(len <= IVL_MAX_FRAME);
	FUZZ_ASSERT(data_inside(d, len));
	FUZZ_ASSERT(((d - fz.data) & (IVL_REC_ALIGN - 1)) == 0);
	for (i = 0; i < len; i++)
		d[i] = pattern(fz.seq, i);
	switch (get8() % 4) {
	case 1:
		meta.flags = IVL_REC_CSUM_VALID;
		break;
	case 2:
		if (len >= 60) {
			meta.flags = IVL_REC_CSUM_PARTIAL;
			meta.csum_start = 34;
			meta.csum_offset = 16;
			meta.gso_type = IVL_GSO_TCPV4;
			meta.gso_size = 1448;
		}
		break;
	case 3:
		return;		/* abandon the reservation */
	}
	ivl_ring_commit(&fz.p, len, &meta);
	if (!fz.tainted) {
		struct model_rec *m = &fz.q[fz.q_tail++ % MAX_QUEUE];

		FUZZ_ASSERT(fz.q_tail - fz.q_head <= MAX_QUEUE);
		m->seq = fz.seq;
		m->len = len;
		m->meta = meta;
		FUZZ_ASSERT(fz.ctrl->prod == fz.p.prod);
	}
	fz.seq++;
}

static void op_consume(void)
{
	struct ivl_rec rec;
	int err = ivl_ring_peek(&fz.c, &rec);
	u32 i;

	FUZZ_ASSERT(err == 0 || err == -EAGAIN || err == -EBADMSG);
	if (!fz.tainted) {
		FUZZ_ASSERT(err != -EBADMSG);
		FUZZ_ASSERT((err == -EAGAIN) == (fz.q_head == fz.q_tail));
		FUZZ_ASSERT(quiet_empty() == (err == -EAGAIN));
	}
	if (err)
		return;
	FUZZ_ASSERT(rec.len <= IVL_MAX_FRAME);
	FUZZ_ASSERT(rec.span == ivl_rec_span(rec.len));
	FUZZ_ASSERT(data_inside(rec.data, rec.len));
	FUZZ_ASSERT(data_inside(rec.data - sizeof(struct ivl_rec_hdr),
				rec.span));
	FUZZ_ASSERT((u32)(rec.data - fz.data - sizeof(struct ivl_rec_hdr)) ==
		    (fz.c.cons & (RING_SIZE - 1)));
	FUZZ_ASSERT(rec.span <= (u32)(fz.c.other - fz.c.cons));
	FUZZ_ASSERT(!(rec.meta.flags & ~(IVL_REC_CSUM_PARTIAL |
					 IVL_REC_CSUM_VALID)));
	if (rec.meta.flags & IVL_REC_CSUM_PARTIAL)
		FUZZ_ASSERT((u32)rec.meta.csum_start + rec.meta.csum_offset +
			    2 <= rec.len);
	/* the copy a driver would make: ASan checks every byte read */
	memcpy(fz.copy, rec.data, rec.len);
	if (!fz.tainted) {
		struct model_rec *m = &fz.q[fz.q_head % MAX_QUEUE];

		FUZZ_ASSERT(rec.len == m->len);
		FUZZ_ASSERT(memcmp(&rec.meta, &m->meta, sizeof(m->meta)) == 0);
		for (i = 0; i < rec.len; i++)
			FUZZ_ASSERT(fz.copy[i] == pattern(m->seq, i));
	}
	if (get8() & 3) {
		ivl_ring_consume(&fz.c, &rec);
		if (!fz.tainted)
			fz.q_head++;
	}
}

static void op_kick(void)
{
	bool pending, kick;

	switch (get8() % 3) {
	case 0:
		pending = ivl_ring_enable_kick(&fz.c);
		kick = ivl_ring_need_kick(&fz.p);
		if (!fz.tainted) {
			FUZZ_ASSERT(pending == (fz.q_head != fz.q_tail));
			FUZZ_ASSERT(kick);
		}
		break;
	case 1:
		ivl_ring_disable_kick(&fz.c);
		kick = ivl_ring_need_kick(&fz.p);
		if (!fz.tainted)
			FUZZ_ASSERT(!kick);
		break;
	default:	/* the peer writes need_kick: harmless */
		fz.ctrl->need_kick = get32();
		(void)ivl_ring_need_kick(&fz.p);
		break;
	}
}

/*
 * The peer rejoined: the server zeroed the ring, but we published into it
 * before we noticed, and both sides attach again.  The producer restarts
 * at the fresh cons, so nothing from before is ever parsed.
 */
static void op_restart(void)
{
	u32 stale = fz.p.prod + (get16() & ~(IVL_REC_ALIGN - 1));

	fz.hook_budget = 0;
	memset(fz.ctrl, 0, sizeof(*fz.ctrl));
	fz.ctrl->prod = stale;
	if (ivl_ring_attach_consumer(&fz.c, fz.mem, RING_SIZE) ||
	    ivl_ring_restart_producer(&fz.p, fz.mem, RING_SIZE))
		abort();
	FUZZ_ASSERT(fz.p.prod == 0 && fz.ctrl->prod == 0);
	FUZZ_ASSERT(ivl_ring_empty(&fz.c));
	fz.tainted = false;
	fz.q_head = 0;
	fz.q_tail = 0;
}

int LLVMFuzzerTestOneInput(const u8 *in, size_t len);

int LLVMFuzzerTestOneInput(const u8 *in, size_t len)
{
	u32 start, ops;

	if (!fz.mem) {
		/* exactly the ring: any stray access is a heap overflow */
		fz.mem = aligned_alloc(IVL_CACHELINE, RING_BYTES);
		FUZZ_ASSERT(fz.mem);
		fz.ctrl = (struct ivl_ring_ctrl *)fz.mem;
		fz.data = fz.mem + IVL_RING_CTRL_SIZE;
	}
	memset(fz.mem, 0, RING_BYTES);
	fz.in = in;
	fz.len = len;
	fz.pos = 0;
	fz.tainted = false;
	fz.hook_budget = 0;
	fz.in_hook = false;
	fz.q_head = 0;
	fz.q_tail = 0;
	fz.seq = 0;

	/* anywhere in the index space, e.g. just before 2^32 or ring end */
	start = get32() & ~(IVL_REC_ALIGN - 1);
	fz.ctrl->prod = start;
	fz.ctrl->cons = start;
	if (ivl_ring_attach_producer(&fz.p, fz.mem, RING_SIZE) ||
	    ivl_ring_attach_consumer(&fz.c, fz.mem, RING_SIZE))
		abort();

	for (ops = 0; ops < MAX_OPS && fz.pos < fz.len; ops++) {
		u8 op = get8();

		switch (op % 8) {
		case 0:
		case 1:
		case 2:
			op_produce();
			break;
		case 3:
		case 4:
			op_consume();
			break;
		case 5:
			op_kick();
			break;
		case 6:
			strike(get8());
			break;
		default:
			if (op & 0x80) {
				op_restart();
				break;
			}
			/* arm the concurrent peer for the next calls */
			fz.hook_budget = get8() % 8;
			break;
		}
		check_invariants();
	}
	return 0;
}
