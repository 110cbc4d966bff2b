// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * ivloop: offload metadata against the frame it describes (ivl_meta.h).
 *
 * The frame is parsed by hand, byte by byte, so the same code runs in the
 * kernel and in user space; no field is trusted before its bounds are
 * checked against @hlen.
 */
#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/errno.h>
#endif
#include "ivl_meta.h"

#define IVL_ETH_HLEN		14U
#define IVL_VLAN_HLEN		4U
#define IVL_MAX_TAGS		2U	/* QinQ: an 802.1ad tag and an 802.1Q tag */
#define IVL_P_IP		0x0800U
#define IVL_P_IPV6		0x86ddU
#define IVL_P_8021Q		0x8100U
#define IVL_P_8021AD		0x88a8U
#define IVL_IPV4_HLEN		20U
#define IVL_IPV6_HLEN		40U
#define IVL_IPPROTO_TCP		6U
#define IVL_IPPROTO_UDP		17U
#define IVL_TCP_HLEN		20U
#define IVL_TCP_CSUM_OFF	16U
#define IVL_UDP_HLEN		8U
#define IVL_UDP_CSUM_OFF	6U
#define IVL_GSO_BY_FRAGS	0xffffU	/* the kernel's, never ours */

/* Where the network header starts, its ethertype, and what follows it. */
struct ivl_l3 {
	u32 nh;			/* network header offset */
	u32 th;			/* transport header offset (IP only) */
	u16 proto;		/* ethertype after the VLAN tags */
	u8 l4proto;		/* IP protocol or IPv6 next header (IP only) */
	bool frag;		/* IPv4 fragment */
};

static u16 ivl_be16(const u8 *p)
{
	return (u16)(p[0] << 8 | p[1]);
}

/* Parse Ethernet, VLAN tags and the IP header; false if cut short. */
static bool ivl_meta_parse(const u8 *frame, u32 hlen, struct ivl_l3 *l3)
{
	u32 off = IVL_ETH_HLEN, ihl, tags = 0;
	u16 proto;

	if (hlen < IVL_ETH_HLEN)
		return false;
	proto = ivl_be16(frame + 12);
	while (proto == IVL_P_8021Q || proto == IVL_P_8021AD) {
		if (++tags > IVL_MAX_TAGS || off + IVL_VLAN_HLEN > hlen)
			return false;
		proto = ivl_be16(frame + off + 2);
		off += IVL_VLAN_HLEN;
	}
	l3->nh = off;
	l3->proto = proto;
	l3->th = 0;
	l3->l4proto = 0;
	l3->frag = false;
	if (proto == IVL_P_IP) {
		if (off + IVL_IPV4_HLEN > hlen || frame[off] >> 4 != 4)
			return false;
		ihl = (frame[off] & 0xfU) * 4U;
		if (ihl < IVL_IPV4_HLEN || off + ihl > hlen)
			return false;
		l3->l4proto = frame[off + 9];
		/* MF set or a fragment offset: not a whole transport segment */
		l3->frag = (ivl_be16(frame + off + 6) & 0x3fffU) != 0;
		l3->th = off + ihl;
	} else if (proto == IVL_P_IPV6) {
		if (off + IVL_IPV6_HLEN > hlen || frame[off] >> 4 != 6)
			return false;
		l3->l4proto = frame[off + 6];
		l3->th = off + IVL_IPV6_HLEN;
	}
	return true;
}

static bool ivl_meta_is_ip(const struct ivl_l3 *l3)
{
	return l3->proto == IVL_P_IP || l3->proto == IVL_P_IPV6;
}

/* A GSO record: the transport header it names is the one the frame has. */
static int ivl_meta_check_gso(const u8 *frame, u32 hlen, u32 len,
			      const struct ivl_rec_meta *m,
			      const struct ivl_l3 *l3)
{
	u32 start = m->csum_start, doff;

	if (!m->gso_size || m->gso_size == IVL_GSO_BY_FRAGS || l3->frag ||
	    start != l3->th)
		return -EINVAL;
	switch (m->gso_type & ~IVL_GSO_ECN) {
	case IVL_GSO_TCPV4:
	case IVL_GSO_TCPV6:
		if (l3->proto != ((m->gso_type & ~IVL_GSO_ECN) == IVL_GSO_TCPV4 ?
				  IVL_P_IP : IVL_P_IPV6) ||
		    l3->l4proto != IVL_IPPROTO_TCP ||
		    m->csum_offset != IVL_TCP_CSUM_OFF ||
		    start + IVL_TCP_HLEN > hlen)
			return -EINVAL;
		doff = (frame[start + 12] >> 4) * 4U;
		if (doff < IVL_TCP_HLEN || start + doff > len)
			return -EINVAL;
		return 0;
	case IVL_GSO_UDP_L4:
		if (!ivl_meta_is_ip(l3) || l3->l4proto != IVL_IPPROTO_UDP ||
		    (m->gso_type & IVL_GSO_ECN) ||
		    m->csum_offset != IVL_UDP_CSUM_OFF ||
		    start + IVL_UDP_HLEN > hlen ||
		    len - start - IVL_UDP_HLEN >
		    (u32)m->gso_size * IVL_UDP_MAX_SEGS)
			return -EINVAL;
		return 0;
	default:
		return -EINVAL;
	}
}

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
 * Context: Any context; does not sleep.  Reads only @m and the first
 * @hlen bytes of @frame, and writes nothing, so it needs no lock.
 *
 * Return: 0 if the metadata fits the frame, -EINVAL if not.
 */
int ivl_meta_check(const u8 *frame, u32 hlen, u32 len,
		   const struct ivl_rec_meta *m)
{
	struct ivl_l3 l3;
	u32 start = m->csum_start;

	if (hlen > len ||
	    (m->flags & (IVL_REC_CSUM_PARTIAL | IVL_REC_CSUM_VALID)) ==
	    (IVL_REC_CSUM_PARTIAL | IVL_REC_CSUM_VALID))
		return -EINVAL;
	if (!(m->flags & IVL_REC_CSUM_PARTIAL))
		/* a GSO frame always leaves its checksum to the device */
		return m->gso_type == IVL_GSO_NONE ? 0 : -EINVAL;
	if (!ivl_meta_parse(frame, hlen, &l3))
		return -EINVAL;
	/*
	 * The checksum covers the transport header onwards: never a byte of
	 * the Ethernet, VLAN or IP headers.  Tunnels and IPv6 extension
	 * headers put it further in, which is fine.
	 */
	if (start < (ivl_meta_is_ip(&l3) ? l3.th : l3.nh) ||
	    start + m->csum_offset + 2U > hlen)
		return -EINVAL;
	if (m->gso_type == IVL_GSO_NONE)
		return 0;
	return ivl_meta_check_gso(frame, hlen, len, m, &l3);
}
