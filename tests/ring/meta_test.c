// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * User-space tests of guest-driver/ivl_meta.c: which offload metadata a
 * record may carry for a frame.  The sender and the receiver apply the
 * same rule, so every case here is both "the receiver refuses it" and
 * "the sender sends that frame lower instead".
 */
#include <stdlib.h>
#include <string.h>

#include "ivl_meta.h"

static int passed, failed;

#define EXPECT(frame, hlen, len, meta, want)				\
	do {								\
		int __got = ivl_meta_check(frame, hlen, len, meta);	\
		if (__got != (want)) {					\
			fprintf(stderr, "FAIL %s:%d: %s: got %d want %d\n", \
				__func__, __LINE__, #meta, __got, (want)); \
			failed++;					\
		} else {						\
			passed++;					\
		}							\
	} while (0)

#define FRAME_MAX	4096

enum l3_kind { L3_V4, L3_V6, L3_ARP };

/*
 * A frame: Ethernet, @tags VLAN tags (the outer one 802.1ad when there are
 * two), an IP header of @kind with protocol @l4 (20 bytes of TCP header or
 * 8 of UDP), then payload up to @len bytes.  Returns the transport offset.
 */
static u32 build(u8 *f, u32 len, unsigned int tags, enum l3_kind kind, u8 l4)
{
	static const u16 tpid[] = { 0x88a8, 0x8100 };
	u32 off = 12, l3;
	unsigned int i;

	memset(f, 0, FRAME_MAX);
	memset(f, 0x52, 6);
	memset(f + 6, 0x54, 6);
	for (i = 0; i < tags; i++) {
		u16 t = tags == 2 ? tpid[i] : 0x8100;

		f[off] = t >> 8;
		f[off + 1] = t & 0xff;
		f[off + 3] = 100 + i;	/* VID */
		off += 4;
	}
	switch (kind) {
	case L3_V4:
		f[off] = 0x08;
		f[off + 1] = 0x00;
		l3 = off + 2;
		f[l3] = 0x45;
		f[l3 + 2] = (len - l3) >> 8;
		f[l3 + 3] = (len - l3) & 0xff;
		f[l3 + 6] = 0x40;	/* DF */
		f[l3 + 8] = 64;
		f[l3 + 9] = l4;
		off = l3 + 20;
		break;
	case L3_V6:
		f[off] = 0x86;
		f[off + 1] = 0xdd;
		l3 = off + 2;
		f[l3] = 0x60;
		f[l3 + 6] = l4;
		f[l3 + 7] = 64;
		off = l3 + 40;
		break;
	default:
		f[off] = 0x08;
		f[off + 1] = 0x06;
		return off + 2;
	}
	if (l4 == 6)
		f[off + 12] = 5 << 4;	/* data offset: 20 bytes */
	return off;
}

static struct ivl_rec_meta partial(u32 start, u16 off)
{
	struct ivl_rec_meta m = {
		.flags = IVL_REC_CSUM_PARTIAL,
		.csum_start = (u16)start,
		.csum_offset = off,
	};

	return m;
}

static struct ivl_rec_meta gso(u16 type, u16 size, u32 start, u16 off)
{
	struct ivl_rec_meta m = partial(start, off);

	m.gso_type = type;
	m.gso_size = size;
	return m;
}

static void test_plain_frames(void)
{
	u8 f[FRAME_MAX];
	u32 th = build(f, 1000, 0, L3_V4, 6);
	struct ivl_rec_meta none = { 0 };
	struct ivl_rec_meta valid = { .flags = IVL_REC_CSUM_VALID };
	struct ivl_rec_meta both = {
		.flags = IVL_REC_CSUM_PARTIAL | IVL_REC_CSUM_VALID,
		.csum_start = (u16)th, .csum_offset = 16,
	};
	struct ivl_rec_meta tcp = partial(th, 16);
	struct ivl_rec_meta in_eth = partial(4, 16);
	struct ivl_rec_meta in_ip = partial(14, 10);
	struct ivl_rec_meta past_hlen = partial(th, 16);
	struct ivl_rec_meta gso_no_csum = { .gso_type = IVL_GSO_TCPV4,
					    .gso_size = 1400 };

	EXPECT(f, 256, 1000, &none, 0);
	EXPECT(f, 256, 1000, &valid, 0);
	EXPECT(f, 256, 1000, &tcp, 0);
	EXPECT(f, 256, 1000, &both, -EINVAL);
	EXPECT(f, 256, 1000, &in_eth, -EINVAL);
	EXPECT(f, 256, 1000, &in_ip, -EINVAL);
	/* the checksum field must lie in the bytes the receiver has linear */
	EXPECT(f, th + 17, 1000, &past_hlen, -EINVAL);
	EXPECT(f, th + 18, 1000, &past_hlen, 0);
	EXPECT(f, 256, 1000, &gso_no_csum, -EINVAL);
	/* a runt or a truncated IP header cannot be checked */
	EXPECT(f, 13, 13, &tcp, -EINVAL);
	EXPECT(f, 30, 1000, &tcp, -EINVAL);
	/* hlen beyond the frame is a caller's bug */
	EXPECT(f, 256, 100, &tcp, -EINVAL);
}

static void test_ipv4_options_and_fragments(void)
{
	u8 f[FRAME_MAX];
	u32 th = build(f, 3000, 0, L3_V4, 6);
	struct ivl_rec_meta old_th, new_th, seg;

	f[14] = 0x46;			/* ihl 6: 4 bytes of options */
	old_th = partial(th, 16);
	new_th = partial(th + 4, 16);
	EXPECT(f, 256, 3000, &old_th, -EINVAL);
	EXPECT(f, 256, 3000, &new_th, 0);
	f[th + 4 + 12] = 5 << 4;
	seg = gso(IVL_GSO_TCPV4, 1400, th + 4, 16);
	EXPECT(f, 256, 3000, &seg, 0);
	f[14 + 6] = 0x20;		/* MF: a fragment is no TCP segment */
	EXPECT(f, 256, 3000, &seg, -EINVAL);
	f[14] = 0x44;			/* ihl 4: below the minimum */
	EXPECT(f, 256, 3000, &new_th, -EINVAL);
}

static void test_gso_matches_protocol(void)
{
	u8 f[FRAME_MAX];
	u32 th;
	struct ivl_rec_meta m;

	th = build(f, 3000, 0, L3_V4, 6);
	m = gso(IVL_GSO_TCPV4, 1400, th, 16);
	EXPECT(f, 256, 3000, &m, 0);
	m = gso(IVL_GSO_TCPV4 | IVL_GSO_ECN, 1400, th, 16);
	EXPECT(f, 256, 3000, &m, 0);
	m = gso(IVL_GSO_TCPV6, 1400, th, 16);
	EXPECT(f, 256, 3000, &m, -EINVAL);
	m = gso(IVL_GSO_UDP_L4, 1400, th, 6);
	EXPECT(f, 256, 3000, &m, -EINVAL);
	m = gso(IVL_GSO_TCPV4, 1400, th, 6);
	EXPECT(f, 256, 3000, &m, -EINVAL);
	m = gso(IVL_GSO_TCPV4, 0, th, 16);
	EXPECT(f, 256, 3000, &m, -EINVAL);
	m = gso(IVL_GSO_TCPV4, 0xffff, th, 16);
	EXPECT(f, 256, 3000, &m, -EINVAL);
	/* the transport header is where csum_start says, not further in */
	m = gso(IVL_GSO_TCPV4, 1400, th + 4, 16);
	EXPECT(f, 256, 3000, &m, -EINVAL);
	f[th + 12] = 4 << 4;		/* TCP data offset below 20 bytes */
	m = gso(IVL_GSO_TCPV4, 1400, th, 16);
	EXPECT(f, 256, 3000, &m, -EINVAL);
	f[th + 12] = 15 << 4;		/* 60 bytes: past a 70-byte frame */
	EXPECT(f, 256, 3000, &m, 0);
	EXPECT(f, 70, 70, &m, -EINVAL);

	th = build(f, 3000, 0, L3_V6, 6);
	m = gso(IVL_GSO_TCPV6, 1400, th, 16);
	EXPECT(f, 256, 3000, &m, 0);
	m = gso(IVL_GSO_TCPV4, 1400, th, 16);
	EXPECT(f, 256, 3000, &m, -EINVAL);
	m = partial(20, 16);		/* inside the IPv6 header */
	EXPECT(f, 256, 3000, &m, -EINVAL);

	th = build(f, 3000, 0, L3_V4, 17);
	m = gso(IVL_GSO_UDP_L4, 1400, th, 6);
	EXPECT(f, 256, 3000, &m, 0);
	m = gso(IVL_GSO_UDP_L4 | IVL_GSO_ECN, 1400, th, 6);
	EXPECT(f, 256, 3000, &m, -EINVAL);
	m = gso(IVL_GSO_TCPV4, 1400, th, 16);
	EXPECT(f, 256, 3000, &m, -EINVAL);
	/* at most IVL_UDP_MAX_SEGS segments, whatever the kernel allows */
	m = gso(IVL_GSO_UDP_L4, 40, th, 6);
	EXPECT(f, 256, th + 8 + 40 * IVL_UDP_MAX_SEGS, &m, 0);
	EXPECT(f, 256, th + 8 + 40 * IVL_UDP_MAX_SEGS + 1, &m, -EINVAL);

	th = build(f, 3000, 0, L3_V6, 17);
	m = gso(IVL_GSO_UDP_L4, 1400, th, 6);
	EXPECT(f, 256, 3000, &m, 0);
}

static void test_vlan_tags(void)
{
	u8 f[FRAME_MAX];
	u32 th;
	struct ivl_rec_meta m;

	th = build(f, 3000, 1, L3_V4, 6);
	m = gso(IVL_GSO_TCPV4, 1400, th, 16);
	EXPECT(f, 256, 3000, &m, 0);
	m = partial(14, 16);		/* in the tag */
	EXPECT(f, 256, 3000, &m, -EINVAL);

	th = build(f, 3000, 2, L3_V6, 6);
	m = gso(IVL_GSO_TCPV6, 1400, th, 16);
	EXPECT(f, 256, 3000, &m, 0);
	m = gso(IVL_GSO_TCPV6, 1400, th - 4, 16);
	EXPECT(f, 256, 3000, &m, -EINVAL);

	/* three tags: more than anything we send, not parsed */
	th = build(f, 3000, 2, L3_V4, 6);
	memmove(f + 16, f + 12, 3000 - 16);
	f[12] = 0x81;
	f[13] = 0x00;
	m = partial(th + 4, 16);
	EXPECT(f, 256, 3000, &m, -EINVAL);
}

static void test_other_protocols(void)
{
	u8 f[FRAME_MAX];
	u32 nh = build(f, 200, 0, L3_ARP, 0);
	struct ivl_rec_meta m = partial(nh, 4);
	struct ivl_rec_meta in_eth = partial(nh - 2, 4);
	struct ivl_rec_meta seg = gso(IVL_GSO_TCPV4, 100, nh, 16);

	/* not IP: a checksum past the L2 headers is the stack's business */
	EXPECT(f, 200, 200, &m, 0);
	EXPECT(f, 200, 200, &in_eth, -EINVAL);
	EXPECT(f, 200, 200, &seg, -EINVAL);
}

/* Random headers and metadata: never a read past hlen (ASan watches). */
static void test_random(void)
{
	unsigned int seed = 1, i;
	struct ivl_rec_meta m;
	u32 hlen, len, j;
	u8 *f;

	for (i = 0; i < 200000; i++) {
		hlen = (u32)rand_r(&seed) % (IVL_META_HDR_MAX + 1);
		len = hlen + (u32)rand_r(&seed) % 70000;
		f = malloc(hlen ? hlen : 1);
		if (!f)
			abort();
		for (j = 0; j < hlen; j++)
			f[j] = (u8)rand_r(&seed);
		if (hlen > 13 && (rand_r(&seed) & 1)) {
			f[12] = (rand_r(&seed) & 1) ? 0x81 : 0x08;
			f[13] = 0;
		}
		m.flags = (u16)(rand_r(&seed) & 7);
		m.gso_type = (u16)(rand_r(&seed) & 0x83);
		m.gso_size = (u16)rand_r(&seed);
		m.csum_start = (u16)(rand_r(&seed) % 300);
		m.csum_offset = (u16)(rand_r(&seed) % 40);
		(void)ivl_meta_check(f, hlen, len, &m);
		free(f);
	}
	passed++;
}

int main(void)
{
	test_plain_frames();
	test_ipv4_options_and_fragments();
	test_gso_matches_protocol();
	test_vlan_tags();
	test_other_protocols();
	test_random();
	printf("meta: %d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
