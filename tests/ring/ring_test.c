// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * User-space tests of guest-driver/ivl_ring.c, in the way tools/virtio/
 * tests virtio_ring: the same source file, built against ivl_user.h.
 *
 * Unit tests check the arithmetic and every validation rule; the stress
 * test runs a producer and a consumer thread over two mappings of one
 * memfd (as two guests map one ivshmem region) and checks order, contents
 * and the need_kick protocol.
 *
 * Environment: IVL_STRESS_RECORDS (default 200000), IVL_STRESS_SEED.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ivl_ring.h"

/*
 * From <linux/futex.h>, which cannot be included here: its <linux/types.h>
 * typedefs __le64 differently from ivl_abi.h's user-space fallback.
 */
#define FUTEX_WAIT	0
#define FUTEX_WAKE	1

static int passed, failed;

#define CHECK(cond, ...)						\
	do {								\
		if (!(cond)) {						\
			fprintf(stderr, "FAIL %s:%d: %s: ", __func__,	\
				__LINE__, #cond);			\
			fprintf(stderr, __VA_ARGS__);			\
			fprintf(stderr, "\n");				\
			failed++;					\
			return;						\
		}							\
	} while (0)

#define RING_SIZE	IVL_RING_MIN_SIZE
#define RING_BYTES	(IVL_RING_CTRL_SIZE + RING_SIZE)

/* A fresh zeroed ring, aligned like the region's rings. */
static void *ring_mem(void)
{
	void *p = aligned_alloc(IVL_RING_CTRL_SIZE, RING_BYTES);

	if (!p) {
		perror("aligned_alloc");
		exit(2);
	}
	memset(p, 0, RING_BYTES);
	return p;
}

static struct ivl_ring_ctrl *ctrl_of(void *mem)
{
	return mem;
}

static u8 pattern(u32 seq, u32 i)
{
	return (u8)(seq * 131u + i * 7u + (i >> 8));
}

/* Produce one record of @len with a pattern; returns false when full. */
static bool produce(struct ivl_ring *p, u32 len, u32 seq,
		    const struct ivl_rec_meta *meta)
{
	u8 *d = ivl_ring_reserve(p, len);
	u32 i;

	if (!d)
		return false;
	for (i = 0; i < len; i++)
		d[i] = pattern(seq, i);
	ivl_ring_commit(p, len, meta);
	return true;
}

static bool rec_matches(const struct ivl_rec *rec, u32 len, u32 seq)
{
	u32 i;

	if (rec->len != len)
		return false;
	for (i = 0; i < len; i++)
		if (rec->data[i] != pattern(seq, i))
			return false;
	return true;
}

static void test_attach(void)
{
	void *mem = ring_mem();
	struct ivl_ring r;

	CHECK(ivl_ring_attach_producer(&r, mem, RING_SIZE) == 0, "ok size");
	CHECK(ivl_ring_attach_consumer(&r, mem, RING_SIZE) == 0, "ok size");
	CHECK(ivl_ring_attach_producer(&r, mem, RING_SIZE + 16) == -EINVAL,
	      "not a power of two");
	CHECK(ivl_ring_attach_producer(&r, mem, RING_SIZE / 2) == -EINVAL,
	      "below minimum");
	CHECK(ivl_ring_attach_consumer(&r, mem, IVL_RING_MAX_SIZE * 2) ==
	      -EINVAL, "above maximum");
	CHECK(ivl_ring_attach_consumer(&r, (u8 *)mem + 4, RING_SIZE) ==
	      -EINVAL, "misaligned base");
	ctrl_of(mem)->prod = 8;
	CHECK(ivl_ring_attach_producer(&r, mem, RING_SIZE) == -EBADMSG,
	      "misaligned shared prod");
	ctrl_of(mem)->cons = 4;
	CHECK(ivl_ring_attach_consumer(&r, mem, RING_SIZE) == -EBADMSG,
	      "misaligned shared cons");
	free(mem);
	passed++;
}

/*
 * A peer rejoined: its consumer starts at a cons of its own while our
 * shared prod still says what we published before.  The restart takes
 * the consumer's cons once and never parses those records.
 */
static void test_restart_producer(void)
{
	void *mem = ring_mem();
	struct ivl_ring p, c;
	struct ivl_rec rec;

	ctrl_of(mem)->prod = 4096;	/* published before the rejoin */
	ctrl_of(mem)->cons = 512;	/* where the new consumer starts */
	CHECK(ivl_ring_restart_producer(&p, mem, RING_SIZE) == 0, "restart");
	CHECK(p.prod == 512, "local prod is the consumer's cons");
	CHECK(ctrl_of(mem)->prod == 512, "shared prod rewound to cons");
	CHECK(ivl_ring_attach_consumer(&c, mem, RING_SIZE) == 0, "attach");
	CHECK(ivl_ring_empty(&c), "old records are gone");
	/* the shared prod is not read back: a rewrite now changes nothing */
	ctrl_of(mem)->prod = 8192;
	CHECK(p.prod == 512, "local prod kept");
	ctrl_of(mem)->prod = 512;
	CHECK(produce(&p, 100, 7, NULL), "produce after restart");
	CHECK(ivl_ring_peek(&c, &rec) == 0 && rec_matches(&rec, 100, 7),
	      "the consumer reads what follows the restart");
	ivl_ring_consume(&c, &rec);
	ctrl_of(mem)->cons = 520;
	CHECK(ivl_ring_restart_producer(&p, mem, RING_SIZE) == -EBADMSG,
	      "misaligned cons refused");
	free(mem);
	passed++;
}

static void test_roundtrip(void)
{
	void *mem = ring_mem();
	struct ivl_ring p, c;
	struct ivl_rec rec;
	struct ivl_rec_meta meta = {
		.flags = IVL_REC_CSUM_PARTIAL,
		.gso_type = IVL_GSO_TCPV4 | IVL_GSO_ECN,
		.gso_size = 1448,
		.csum_start = 34,
		.csum_offset = 16,
	};

	CHECK(ivl_ring_attach_producer(&p, mem, RING_SIZE) == 0, "attach");
	CHECK(ivl_ring_attach_consumer(&c, mem, RING_SIZE) == 0, "attach");
	CHECK(ivl_ring_empty(&c), "fresh ring is empty");
	CHECK(!ivl_ring_pending(&c), "fresh ring has nothing pending");
	CHECK(ivl_ring_peek(&c, &rec) == -EAGAIN, "peek on empty");
	CHECK(produce(&p, 1500, 1, &meta), "produce");
	CHECK(ctrl_of(mem)->prod == ivl_rec_span(1500), "prod published");
	CHECK(!ivl_ring_empty(&c), "not empty after commit");
	CHECK(ivl_ring_pending(&c), "pending after commit");
	CHECK(ivl_ring_peek(&c, &rec) == 0, "peek");
	CHECK(rec_matches(&rec, 1500, 1), "contents");
	CHECK(rec.span == ivl_rec_span(1500), "span %u", rec.span);
	CHECK(memcmp(&rec.meta, &meta, sizeof(meta)) == 0, "meta");
	CHECK(ivl_ring_peek(&c, &rec) == 0 && rec.len == 1500,
	      "peek again without consume gives the same record");
	ivl_ring_consume(&c, &rec);
	CHECK(ctrl_of(mem)->cons == ivl_rec_span(1500), "cons published");
	CHECK(ivl_ring_peek(&c, &rec) == -EAGAIN, "empty after consume");
	CHECK(!ivl_ring_pending(&c), "nothing pending after consume");

	/* zero-length record and NULL meta */
	CHECK(produce(&p, 0, 2, NULL), "produce 0 bytes");
	CHECK(ivl_ring_peek(&c, &rec) == 0 && rec.len == 0 &&
	      rec.span == IVL_REC_ALIGN && rec.meta.flags == 0, "empty rec");
	ivl_ring_consume(&c, &rec);

	/* too long: NULL but not broken */
	CHECK(!ivl_ring_reserve(&p, IVL_MAX_FRAME + 1), "too long");
	CHECK(ivl_ring_check_producer(&p) == 0, "too long is not broken");
	CHECK(!ivl_ring_has_room(&p, IVL_MAX_FRAME + 1), "no room too long");
	CHECK(ivl_ring_has_room(&p, IVL_MAX_FRAME), "room for max frame");
	free(mem);
	passed++;
}

static void test_full(void)
{
	void *mem = ring_mem();
	struct ivl_ring p, c;
	struct ivl_rec rec;
	u32 n = 0, len = 1100, span = ivl_rec_span(1100), i;

	CHECK(ivl_ring_attach_producer(&p, mem, RING_SIZE) == 0, "attach");
	CHECK(ivl_ring_attach_consumer(&c, mem, RING_SIZE) == 0, "attach");
	for (i = 0; i < RING_SIZE; i++) {
		bool room = ivl_ring_has_room(&p, len);

		if (!produce(&p, len, n, NULL)) {
			CHECK(!room, "has_room said yes, reserve said no");
			break;
		}
		CHECK(room, "has_room said no, reserve said yes");
		n++;
	}
	CHECK(n == RING_SIZE / span, "filled %u records", n);
	CHECK(ivl_ring_check_producer(&p) == 0, "full is not broken");
	/* the tail left is smaller than a record: exactly fits small ones */
	CHECK(produce(&p, RING_SIZE - n * span - IVL_REC_ALIGN, n, NULL),
	      "fill the tail exactly");
	n++;
	CHECK(!ivl_ring_reserve(&p, 0), "now completely full");
	CHECK(ctrl_of(mem)->prod - ctrl_of(mem)->cons == RING_SIZE, "full");
	for (i = 0; i < n; i++) {
		CHECK(ivl_ring_peek(&c, &rec) == 0, "peek %u", i);
		CHECK(rec_matches(&rec, i + 1 < n ? len : rec.len, i),
		      "contents %u", i);
		ivl_ring_consume(&c, &rec);
	}
	CHECK(ivl_ring_peek(&c, &rec) == -EAGAIN, "drained");
	free(mem);
	passed++;
}

/* Start both sides at @start (a free-running index) on a zeroed ring. */
static int attach_at(void *mem, struct ivl_ring *p, struct ivl_ring *c,
		     u32 start)
{
	ctrl_of(mem)->prod = start;
	ctrl_of(mem)->cons = start;
	if (ivl_ring_attach_producer(p, mem, RING_SIZE) ||
	    ivl_ring_attach_consumer(c, mem, RING_SIZE))
		return -1;
	return 0;
}

static void test_pad(void)
{
	void *mem = ring_mem();
	u8 *data = (u8 *)mem + IVL_RING_CTRL_SIZE;
	struct ivl_ring p, c;
	struct ivl_rec rec;
	struct ivl_rec_hdr *pad;
	u32 start = RING_SIZE - 256;	/* 256 bytes before the end */

	CHECK(attach_at(mem, &p, &c, start) == 0, "attach");
	/* exactly fits to the end: no pad */
	CHECK(produce(&p, 256 - 16, 1, NULL), "fits to the end");
	CHECK(ivl_ring_peek(&c, &rec) == 0 && rec_matches(&rec, 240, 1),
	      "record up to the end");
	CHECK(rec.data + rec.len == data + RING_SIZE, "ends at ring end");
	ivl_ring_consume(&c, &rec);
	CHECK((c.cons & c.mask) == 0, "wrapped to start");

	/* now one that needs a pad */
	CHECK(attach_at(mem, &p, &c, start) == 0, "attach");
	CHECK(produce(&p, 241, 2, NULL), "needs a pad");
	pad = (struct ivl_rec_hdr *)(data + RING_SIZE - 256);
	CHECK(pad->flags == IVL_REC_PAD && pad->len == 240, "pad header");
	CHECK(ctrl_of(mem)->prod == start + 256 + ivl_rec_span(241),
	      "prod covers pad and record");
	CHECK(ivl_ring_peek(&c, &rec) == 0 && rec_matches(&rec, 241, 2),
	      "record after pad");
	CHECK(rec.data == data + 16, "record at ring start");
	CHECK(ctrl_of(mem)->cons == start + 256, "pad released by peek");
	ivl_ring_consume(&c, &rec);
	CHECK(ctrl_of(mem)->cons == ctrl_of(mem)->prod, "all consumed");

	/* a pad needs room for itself and the record */
	CHECK(attach_at(mem, &p, &c, start) == 0, "attach");
	ctrl_of(mem)->cons = start + 256 + 320 - RING_SIZE;
	CHECK(ivl_ring_has_room(&p, 300), "room for pad + 320");
	CHECK(ivl_ring_reserve(&p, 300), "pad + 320 fits exactly");
	CHECK(attach_at(mem, &p, &c, start) == 0, "attach");
	ctrl_of(mem)->cons = start + 256 + 304 - RING_SIZE;
	CHECK(!ivl_ring_reserve(&p, 300), "pad + 320 does not fit in 560");
	CHECK(ivl_ring_check_producer(&p) == 0, "full, not broken");
	CHECK(!ivl_ring_has_room(&p, 300), "has_room counts the pad");
	CHECK(ivl_ring_has_room(&p, 240), "fits the tail without a pad");
	CHECK(ivl_ring_reserve(&p, 240), "fits the tail without a pad");
	free(mem);
	passed++;
}

/* Indices cross 2^32 many times over with random sizes. */
static void test_index_wrap(void)
{
	void *mem = ring_mem();
	struct ivl_ring p, c;
	struct ivl_rec rec;
	u32 seq_p = 0, seq_c = 0, i, rnd = 12345;
	u32 lens[4096];

	CHECK(attach_at(mem, &p, &c, 0u - 3 * 4096) == 0, "attach");
	for (i = 0; i < 40000; i++) {
		rnd = rnd * 1103515245u + 12345u;
		if ((rnd >> 16) & 1) {
			u32 len = (rnd >> 8) % (IVL_MAX_FRAME + 1);

			if (seq_p - seq_c < 4096 && produce(&p, len, seq_p, NULL))
				lens[seq_p++ % 4096] = len;
		} else {
			int err = ivl_ring_peek(&c, &rec);

			if (seq_c == seq_p) {
				CHECK(err == -EAGAIN, "empty: %d", err);
				continue;
			}
			CHECK(err == 0, "peek %u: %d", seq_c, err);
			CHECK(rec_matches(&rec, lens[seq_c % 4096], seq_c),
			      "record %u", seq_c);
			ivl_ring_consume(&c, &rec);
			seq_c++;
		}
	}
	CHECK(seq_c > 1000, "only %u records", seq_c);
	CHECK(p.prod < 0u - 3 * 4096, "indices wrapped past 2^32");
	free(mem);
	passed++;
}

/* Each hostile header must give -EBADMSG, sticky, without side effects. */
static void test_bad_records(void)
{
	static const struct {
		const char *what;
		u32 off;	/* record offset before the ring end, 0: start */
		u32 avail;	/* published bytes, 0: span of the record */
		struct ivl_rec_hdr h;
	} cases[] = {
		{ "unknown flag", 0, 0, { .len = 10, .flags = 0x8 } },
		{ "len > max", 0, RING_SIZE, { .len = IVL_MAX_FRAME + 1 } },
		{ "span > avail", 0, 32, { .len = 17 } },
		{ "crosses end", 64, 128, { .len = 100 } },
		{ "pad short", 64, 64, { .len = 32, .flags = IVL_REC_PAD } },
		{ "pad long", 64, 128, { .len = 64, .flags = IVL_REC_PAD } },
		{ "pad + flag", 64, 64,
		  { .len = 48, .flags = IVL_REC_PAD | IVL_REC_CSUM_VALID } },
		{ "pad not published", 64, 48,
		  { .len = 48, .flags = IVL_REC_PAD } },
		{ "pad at start", 0, RING_SIZE,
		  { .len = RING_SIZE - 16, .flags = IVL_REC_PAD } },
		{ "unknown gso", 0, 0, { .len = 100, .gso_type = 4,
					  .gso_size = 100 } },
		{ "gso size 0", 0, 0, { .len = 100, .gso_type = 1 } },
		{ "ecn alone", 0, 0, { .len = 100, .gso_type = 0x80,
					.gso_size = 100 } },
		{ "csum past end", 0, 0,
		  { .len = 100, .flags = IVL_REC_CSUM_PARTIAL,
		    .csum_start = 90, .csum_offset = 9 } },
		{ "csum overflow", 0, 0,
		  { .len = 100, .flags = IVL_REC_CSUM_PARTIAL,
		    .csum_start = 0xffff, .csum_offset = 0xffff } },
	};
	void *mem = ring_mem();
	u8 *data = (u8 *)mem + IVL_RING_CTRL_SIZE;
	struct ivl_ring p, c;
	struct ivl_rec rec;
	unsigned int i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		u32 start = cases[i].off ? RING_SIZE - cases[i].off : 0;
		u32 avail = cases[i].avail ? cases[i].avail :
			    ivl_rec_span(cases[i].h.len);

		memset(mem, 0, RING_BYTES);
		CHECK(attach_at(mem, &p, &c, start) == 0, "attach");
		memcpy(data + start, &cases[i].h, sizeof(cases[i].h));
		ctrl_of(mem)->prod = start + avail;
		CHECK(ivl_ring_peek(&c, &rec) == -EBADMSG, "%s", cases[i].what);
		CHECK(c.cons == start && ctrl_of(mem)->cons == start,
		      "%s: cons moved", cases[i].what);
		/* fix the record: the error stays */
		memset(data + start, 0, sizeof(cases[i].h));
		CHECK(ivl_ring_peek(&c, &rec) == -EBADMSG, "%s: sticky",
		      cases[i].what);
		CHECK(!ivl_ring_empty(&c), "%s: broken is not empty",
		      cases[i].what);
	}

	/* valid edge cases, for contrast */
	memset(mem, 0, RING_BYTES);
	CHECK(attach_at(mem, &p, &c, 0) == 0, "attach");
	((struct ivl_rec_hdr *)data)->len = 100;
	((struct ivl_rec_hdr *)data)->flags = IVL_REC_CSUM_PARTIAL;
	((struct ivl_rec_hdr *)data)->csum_start = 90;
	((struct ivl_rec_hdr *)data)->csum_offset = 8;
	ctrl_of(mem)->prod = ivl_rec_span(100);
	CHECK(ivl_ring_peek(&c, &rec) == 0, "csum field ends at len");
	free(mem);
	passed++;
}

static void test_bad_indices(void)
{
	void *mem = ring_mem();
	struct ivl_ring p, c;
	struct ivl_rec rec;

	CHECK(attach_at(mem, &p, &c, 4096) == 0, "attach");
	ctrl_of(mem)->prod = 4096 + RING_SIZE + 16;
	CHECK(ivl_ring_peek(&c, &rec) == -EBADMSG, "prod too far");
	CHECK(ivl_ring_enable_kick(&c),
	      "enable_kick on broken says keep polling");

	CHECK(attach_at(mem, &p, &c, 4096) == 0, "attach");
	ctrl_of(mem)->prod = 4096 - 16;
	CHECK(ivl_ring_peek(&c, &rec) == -EBADMSG, "prod behind cons");

	CHECK(attach_at(mem, &p, &c, 4096) == 0, "attach");
	ctrl_of(mem)->prod = 4096 + 8;
	CHECK(ivl_ring_peek(&c, &rec) == -EBADMSG, "prod misaligned");

	CHECK(attach_at(mem, &p, &c, 4096) == 0, "attach");
	ctrl_of(mem)->prod = 4096 + RING_SIZE;
	CHECK(ivl_ring_peek(&c, &rec) != -EBADMSG, "prod exactly full ok");

	CHECK(attach_at(mem, &p, &c, 4096) == 0, "attach");
	CHECK(produce(&p, 100, 0, NULL), "produce");
	ctrl_of(mem)->cons = p.prod + 16;
	CHECK(!ivl_ring_reserve(&p, 100), "cons ahead of prod");
	CHECK(ivl_ring_check_producer(&p) == -EBADMSG, "broken");
	ctrl_of(mem)->cons = p.prod;
	CHECK(ivl_ring_check_producer(&p) == -EBADMSG, "sticky");
	CHECK(!ivl_ring_has_room(&p, 0), "no room when broken");

	CHECK(attach_at(mem, &p, &c, 4096) == 0, "attach");
	ctrl_of(mem)->cons = 4096 - RING_SIZE - 16;
	CHECK(!ivl_ring_has_room(&p, 0), "cons too far behind");
	CHECK(ivl_ring_check_producer(&p) == -EBADMSG, "broken");

	CHECK(attach_at(mem, &p, &c, 4096) == 0, "attach");
	ctrl_of(mem)->cons = 4096 - 4;
	CHECK(ivl_ring_check_producer(&p) == -EBADMSG, "cons misaligned");
	free(mem);
	passed++;
}

static void test_kick(void)
{
	void *mem = ring_mem();
	struct ivl_ring p, c;
	struct ivl_rec rec;
	u32 prod;

	CHECK(attach_at(mem, &p, &c, 0) == 0, "attach");
	CHECK(produce(&p, 10, 0, NULL), "produce");
	CHECK(!ivl_ring_need_kick(&p), "consumer polling: no kick");
	CHECK(ivl_ring_enable_kick(&c), "records pending: keep polling");
	CHECK(ivl_ring_need_kick(&p), "flag set: kick");
	ivl_ring_disable_kick(&c);
	CHECK(!ivl_ring_need_kick(&p), "flag cleared");
	CHECK(ivl_ring_peek(&c, &rec) == 0, "peek");
	ivl_ring_consume(&c, &rec);
	CHECK(!ivl_ring_enable_kick(&c), "empty: may sleep");
	CHECK(ctrl_of(mem)->need_kick == 1, "flag in shared memory");
	/* batching: two commits, one kick */
	CHECK(produce(&p, 10, 1, NULL) && produce(&p, 20, 2, NULL), "batch");
	CHECK(ivl_ring_need_kick(&p), "kick after batch");
	prod = ctrl_of(mem)->prod;

	/* commit without reserve publishes nothing */
	fprintf(stderr, "(a WARNING about a commit misuse is expected)\n");
	ivl_ring_commit(&p, 10, NULL);
	CHECK(ctrl_of(mem)->prod == prod, "misused commit ignored");
	/* commit longer than reserved publishes nothing */
	CHECK(ivl_ring_reserve(&p, 10), "reserve");
	ivl_ring_commit(&p, 100, NULL);
	CHECK(ctrl_of(mem)->prod == prod, "overlong commit ignored");
	free(mem);
	passed++;
}

/* ---- two-thread stress ---------------------------------------------- */

struct stress {
	struct ivl_ring p, c;
	u32 records;
	u64 seed;
	u32 bell;		/* doorbell: the producer bumps and wakes */
	u64 nokick_total;	/* bytes published at the last no-kick */
	u64 kicks, sleeps, full_spins;
	const char *error;
	volatile bool stop;
};

static u64 xorshift(u64 *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/* Length, metadata and payload of record @seq: both sides derive them. */
static u32 stress_len(u64 seed, u32 seq)
{
	u64 s = seed ^ ((u64)seq * 0x9e3779b97f4a7c15ull) ^ 1;
	u64 x = xorshift(&s), y = xorshift(&s);

	switch (x % 10) {
	case 0:
		return 1 + y % IVL_MAX_FRAME;
	case 1:
	case 2:
	case 3:
		return 1 + y % 2048;
	default:
		return 1 + y % 128;
	}
}

static void stress_fill(u8 *d, u32 len, u64 seed, u32 seq)
{
	u64 s = seed ^ ((u64)seq << 32) ^ seq ^ 2, x;
	u32 i;

	memcpy(d, &seq, len < 4 ? len : 4);
	for (i = 4; i + 8 <= len; i += 8) {
		x = xorshift(&s);
		memcpy(d + i, &x, 8);
	}
	x = xorshift(&s);
	if (i < len)
		memcpy(d + i, &x, len - i);
}

static bool stress_check(const u8 *d, u32 len, u64 seed, u32 seq)
{
	u8 buf[IVL_MAX_FRAME];

	stress_fill(buf, len, seed, seq);
	return memcmp(buf, d, len) == 0;
}

static void futex_wake(u32 *addr)
{
	syscall(SYS_futex, addr, FUTEX_WAKE, 1, NULL, NULL, 0);
}

static int futex_wait(u32 *addr, u32 val, long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };

	return syscall(SYS_futex, addr, FUTEX_WAIT, val, &ts, NULL, 0);
}

static void *stress_producer(void *arg)
{
	struct stress *st = arg;
	u64 rnd = st->seed | 1, published = 0;
	u32 seq = 0, batch = 0;
	u8 *d;

	while (seq < st->records && !st->stop) {
		u32 len = stress_len(st->seed, seq);
		struct ivl_rec_meta meta = { .gso_type = IVL_GSO_NONE,
					     .flags = seq & 1 ?
						IVL_REC_CSUM_VALID : 0 };

		d = ivl_ring_reserve(&st->p, len);
		if (!d) {
			if (ivl_ring_check_producer(&st->p)) {
				st->error = "producer: ring broken";
				st->stop = true;
				break;
			}
			/* full: the consumer is awake and draining */
			st->full_spins++;
			sched_yield();
			continue;
		}
		stress_fill(d, len, st->seed, seq);
		ivl_ring_commit(&st->p, len, &meta);
		published += ivl_rec_span(len);
		seq++;
		if (++batch < 1 + xorshift(&rnd) % 8 && seq < st->records)
			continue;	/* xmit_more */
		batch = 0;
		if (ivl_ring_need_kick(&st->p)) {
			__atomic_add_fetch(&st->bell, 1, __ATOMIC_SEQ_CST);
			futex_wake(&st->bell);
			st->kicks++;
		} else {
			/* the oracle for lost wakeups, see the consumer */
			__atomic_store_n(&st->nokick_total, published,
					 __ATOMIC_SEQ_CST);
		}
		/*
		 * Now and then wait until the consumer caught up, then go on
		 * after a short random delay: its enable_kick() and our next
		 * commit + need_kick() then race, which is the window where
		 * a missing barrier loses a wakeup.
		 */
		if (xorshift(&rnd) % 4 == 0) {
			u32 n = xorshift(&rnd) % 3000;

			while (!st->stop &&
			       le32_to_cpu(__atomic_load_n(&st->p.ctrl->cons,
							   __ATOMIC_ACQUIRE)) !=
			       st->p.prod)
				sched_yield();
			while (n--)
				__asm__ __volatile__("" : : : "memory");
		}
	}
	return NULL;
}

static void *stress_consumer(void *arg)
{
	struct stress *st = arg;
	u64 consumed = 0;
	u32 seq = 0, bell;
	struct ivl_rec rec;
	int err = 0, idle_ms = 0;

	while (seq < st->records && !st->stop) {
		ivl_ring_disable_kick(&st->c);
		while (seq < st->records && (err = ivl_ring_peek(&st->c, &rec)) == 0) {
			u32 len = stress_len(st->seed, seq);

			if (rec.len != len ||
			    !stress_check(rec.data, len, st->seed, seq) ||
			    rec.meta.flags != (seq & 1 ? IVL_REC_CSUM_VALID : 0)) {
				fprintf(stderr, "record %u: len %u want %u\n",
					seq, rec.len, len);
				st->error = "consumer: wrong record contents";
				st->stop = true;
				return NULL;
			}
			ivl_ring_consume(&st->c, &rec);
			consumed += rec.span;
			seq++;
			idle_ms = 0;
		}
		if (seq == st->records)
			break;
		if (err != -EAGAIN) {
			st->error = "consumer: ring broken";
			st->stop = true;
			return NULL;
		}
		/*
		 * Read the bell before enable_kick, as an interrupt handler
		 * would be armed before it: a kick between the two then
		 * makes futex_wait return at once.
		 */
		bell = __atomic_load_n(&st->bell, __ATOMIC_SEQ_CST);
		if (ivl_ring_enable_kick(&st->c))
			continue;
		st->sleeps++;
		if (futex_wait(&st->bell, bell, 100) && errno == ETIMEDOUT)
			idle_ms += 100;
		/*
		 * We slept having consumed everything up to @consumed.  Any
		 * no-kick decision the producer logged since, for bytes past
		 * that, was taken while need_kick was set: a lost wakeup
		 * (masked here only by the producer's next kick).  Read the
		 * log before disable_kick, so every decision in it saw our
		 * need_kick store or came before it.
		 */
		if (__atomic_load_n(&st->nokick_total, __ATOMIC_SEQ_CST) >
		    consumed) {
			st->error = "lost wakeup: producer skipped a kick "
				    "while the consumer slept";
			st->stop = true;
			return NULL;
		}
		if (idle_ms > 20000) {
			st->error = "consumer: no progress for 20 s";
			st->stop = true;
			return NULL;
		}
	}
	return NULL;
}

static void test_stress(void)
{
	const char *env = getenv("IVL_STRESS_RECORDS");
	struct stress *st = calloc(1, sizeof(*st));
	pthread_t tp, tc;
	void *map_p, *map_c;
	int fd;

	CHECK(st, "calloc");
	st->records = env ? (u32)strtoul(env, NULL, 0) : 200000;
	env = getenv("IVL_STRESS_SEED");
	st->seed = env ? strtoull(env, NULL, 0) : (u64)time(NULL);
	fprintf(stderr, "stress: %u records, IVL_STRESS_SEED=%llu\n",
		st->records, (unsigned long long)st->seed);

	/* two mappings of one memfd, like two guests' views of BAR2 */
	fd = memfd_create("ivl_ring_test", 0);
	CHECK(fd >= 0, "memfd_create");
	CHECK(ftruncate(fd, RING_BYTES) == 0, "ftruncate");
	map_p = mmap(NULL, RING_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED,
		     fd, 0);
	map_c = mmap(NULL, RING_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED,
		     fd, 0);
	CHECK(map_p != MAP_FAILED && map_c != MAP_FAILED, "mmap");
	/* start near the end of both the ring and the u32 index space */
	((struct ivl_ring_ctrl *)map_p)->prod = 0u - RING_SIZE / 2 - 512;
	((struct ivl_ring_ctrl *)map_p)->cons = 0u - RING_SIZE / 2 - 512;
	CHECK(ivl_ring_attach_producer(&st->p, map_p, RING_SIZE) == 0, "ap");
	CHECK(ivl_ring_attach_consumer(&st->c, map_c, RING_SIZE) == 0, "ac");

	CHECK(pthread_create(&tc, NULL, stress_consumer, st) == 0, "thread");
	CHECK(pthread_create(&tp, NULL, stress_producer, st) == 0, "thread");
	pthread_join(tp, NULL);
	pthread_join(tc, NULL);
	fprintf(stderr, "stress: %llu kicks, %llu sleeps, %llu full spins\n",
		(unsigned long long)st->kicks, (unsigned long long)st->sleeps,
		(unsigned long long)st->full_spins);
	munmap(map_p, RING_BYTES);
	munmap(map_c, RING_BYTES);
	close(fd);
	CHECK(!st->error, "%s (IVL_STRESS_SEED=%llu)", st->error,
	      (unsigned long long)st->seed);
	CHECK(st->sleeps > 0, "consumer never slept: kicks not exercised");
	free(st);
	passed++;
}

/* ---- need_kick litmus -------------------------------------------------- */

/*
 * The store-buffering litmus test behind need_kick, played many times with
 * both sides released at the same instant: the producer commits and asks
 * need_kick(), the consumer calls enable_kick().  At least one of them
 * must see the other (a kick, or "keep polling"); both missing is a lost
 * wakeup.  Without the smp_mb() on either side this fails on x86 within a
 * few thousand rounds.
 */
struct litmus {
	struct ivl_ring p, c;
	u32 go, done_p, done_c, rounds, lost, both;
	u64 start;		/* cycle count at which both sides act */
	bool res_p;
};

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
static u64 litmus_now(void)
{
	return __rdtsc();	/* synchronised across CPUs (constant_tsc) */
}
#define LITMUS_LEAD	20000	/* cycles: time for both to see @go */
#define LITMUS_JITTER	512
#else
static u64 litmus_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (u64)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}
#define LITMUS_LEAD	10000	/* ns */
#define LITMUS_JITTER	256
#endif

/* Spin until @t plus a random jitter, so both sides act at once. */
static void litmus_until(u64 t, u64 *rnd)
{
	t += xorshift(rnd) % LITMUS_JITTER;
	while (litmus_now() < t)
		;
}

static u64 xorshift(u64 *s);

static void litmus_wait(const u32 *v, u32 want)
{
	u32 spins = 0;

	while (__atomic_load_n(v, __ATOMIC_ACQUIRE) != want)
		if (++spins % 4096 == 0)
			sched_yield();	/* fewer CPUs than threads */
}

/* The producer also paces the rounds, so only two threads spin. */
static void *litmus_producer(void *arg)
{
	struct litmus *l = arg;
	u64 rnd = 88172645463325252ull;
	u32 i;

	for (i = 1; i <= l->rounds; i++) {
		u8 *d;

		litmus_wait(&l->done_c, i - 1);
		l->start = litmus_now() + LITMUS_LEAD;
		__atomic_store_n(&l->go, i, __ATOMIC_RELEASE);
		litmus_until(l->start, &rnd);
		d = ivl_ring_reserve(&l->p, 8);
		if (d) {
			memset(d, 0, 8);
			ivl_ring_commit(&l->p, 8, NULL);
		}
		l->res_p = ivl_ring_need_kick(&l->p);
		__atomic_store_n(&l->done_p, i, __ATOMIC_RELEASE);
	}
	return NULL;
}

static void *litmus_consumer(void *arg)
{
	struct litmus *l = arg;
	u64 rnd = 0x2545f4914f6cdd1dull;
	struct ivl_rec rec;
	bool res_c;
	u32 i;

	for (i = 1; i <= l->rounds; i++) {
		litmus_wait(&l->go, i);
		litmus_until(l->start, &rnd);
		res_c = ivl_ring_enable_kick(&l->c);
		litmus_wait(&l->done_p, i);
		if (!l->res_p && !res_c)
			l->lost++;
		l->both += l->res_p && res_c;
		/* reset for the next round; the producer waits for done_c */
		while (ivl_ring_peek(&l->c, &rec) == 0)
			ivl_ring_consume(&l->c, &rec);
		ivl_ring_disable_kick(&l->c);
		__atomic_store_n(&l->done_c, i, __ATOMIC_RELEASE);
	}
	return NULL;
}

static void test_kick_litmus(void)
{
	const char *env = getenv("IVL_LITMUS_ROUNDS");
	struct litmus *l = calloc(1, sizeof(*l));
	void *mem = ring_mem();
	pthread_t tp, tc;

	CHECK(l, "calloc");
	l->rounds = env ? (u32)strtoul(env, NULL, 0) : 300000;
	CHECK(attach_at(mem, &l->p, &l->c, 0) == 0, "attach");
	CHECK(pthread_create(&tc, NULL, litmus_consumer, l) == 0, "thread");
	CHECK(pthread_create(&tp, NULL, litmus_producer, l) == 0, "thread");
	pthread_join(tp, NULL);
	pthread_join(tc, NULL);
	fprintf(stderr, "litmus: %u rounds, %u saw each other, %u lost\n",
		l->rounds, l->both, l->lost);
	CHECK(l->lost == 0, "%u lost wakeups in %u rounds", l->lost,
	      l->rounds);
	free(l);
	free(mem);
	passed++;
}

int main(void)
{
	test_attach();
	test_restart_producer();
	test_roundtrip();
	test_full();
	test_pad();
	test_index_wrap();
	test_bad_records();
	test_bad_indices();
	test_kick();
	test_kick_litmus();
	test_stress();
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
