/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * ivloop shared-region ABI, version 2.
 *
 * This header is the single source of truth for the layout of the region
 * that ivloop-server creates and every guest maps through BAR2 of QEMU's
 * ivshmem-doorbell device.  qemu-dev/ivloop_server/abi.py mirrors it and
 * tests/server/test_abi.py checks the mirror against a compiled probe of this file.
 *
 *   [ header | directory: max_peers slots | ring i->j for every ordered pair ]
 *
 * All multi-byte fields are little-endian.  Everything in the region is
 * untrusted: a reader copies a field once into a local, checks it, then uses
 * the local.
 */
#ifndef IVL_ABI_H
#define IVL_ABI_H

#ifdef __KERNEL__
#include <linux/types.h>
#else
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __le16;
typedef uint32_t __le32;
typedef uint64_t __le64;
#endif

#define IVL_MAGIC		0x504c5649U	/* "IVLP" in memory order */
#define IVL_ABI_VERSION		2U

#define IVL_CACHELINE		64U
#define IVL_HDR_SIZE		4096U	/* the header owns the first page */
#define IVL_SLOT_SIZE		128U	/* sizeof(struct ivl_slot) */
#define IVL_MAX_PEERS		64U	/* hard cap on max_peers */
#define IVL_RING_CTRL_SIZE	256U	/* sizeof(struct ivl_ring_ctrl) */
#define IVL_RING_MIN_SIZE	(256U * 1024U)	/* fits a 64 KiB TSO frame twice */
#define IVL_RING_MAX_SIZE	(64U * 1024U * 1024U)
#define IVL_REC_ALIGN		16U
#define IVL_MAX_FRAME		(65536U + 256U)	/* GSO frame + L2 headroom */

/* Doorbell (MSI-X) vectors. */
#define IVL_VEC_MEMBERSHIP	0U	/* directory changed */
#define IVL_VEC_DATA		1U	/* a ring has new records or space */
#define IVL_NR_VECTORS		2U

/* ivshmem BAR0 registers (QEMU docs/specs/ivshmem-spec.rst). */
#define IVL_REG_INTRMASK	0x00
#define IVL_REG_INTRSTATUS	0x04
#define IVL_REG_IVPOSITION	0x08
#define IVL_REG_DOORBELL	0x0c

/*
 * Region header, at offset 0.  Written by the server only, once before the
 * first peer connects, except for @generation and @nr_present.
 */
struct ivl_region_hdr {
	__le32 magic;		/* IVL_MAGIC */
	__le32 version;		/* IVL_ABI_VERSION */
	__le64 region_size;	/* bytes, power of two, == BAR2 size */
	__le32 max_peers;	/* directory slots == IVPosition limit */
	__le32 ring_size;	/* data bytes per ring, power of two */
	__le32 dir_offset;	/* offset of slot 0, == IVL_HDR_SIZE */
	__le32 slot_size;	/* == IVL_SLOT_SIZE */
	__le64 rings_offset;	/* offset of ring 0->0, page aligned */
	__le64 ring_stride;	/* IVL_RING_CTRL_SIZE + ring_size */
	__le64 generation;	/* bumped on every join and every leave */
	__le32 nr_present;	/* slots with present != 0 */
	__le32 reserved0;
};				/* 64 bytes */

enum ivl_slot_state {
	IVL_STATE_DOWN = 0,	/* no driver, or driver not ready */
	IVL_STATE_UP = 1,	/* consuming its rings; peers may send */
	IVL_STATE_LEAVING = 2,	/* draining: peers must stop sending */
};

/*
 * Directory slot i, at dir_offset + i * slot_size, one per IVPosition.
 * The first cache line belongs to the server, the second to the guest that
 * holds IVPosition i, so neither ever writes a line the other writes.
 * Slot index and QEMU peer ID differ: QEMU cannot take a peer ID back (its
 * ivshmem frees a departed peer's eventfd array and then reuses it), so the
 * server never reuses an ID; a guest finds its slot as the present slot
 * whose peer_id equals its IVPosition, and rings a peer at that slot's
 * peer_id.
 *
 * Both halves are read with a sequence protocol (ABI 2): the writer makes
 * its half's seq odd, writes the fields, then makes seq even again, with a
 * write barrier on each side; a reader loads seq (acquire), copies the
 * fields, loads seq again after a read barrier and retries, or keeps its
 * previous view, while seq is odd or changed.  heartbeat and leave_ack are
 * single naturally aligned words outside the protocol.
 */
struct ivl_slot {
	/* written by the server only */
	__le32 present;		/* 1 while a QEMU holds this IVPosition */
	__le32 peer_id;		/* QEMU peer ID (IVPosition) of the occupant */
	__le64 generation;	/* region generation of this slot's last join/leave */
	__le32 srv_seq;		/* odd while the server rewrites this half */
	__le32 srv_flags;	/* IVL_SLOT_F_* */
	__u8 nic_mac[6];	/* the occupant's data-NIC MAC, if MAC_KNOWN */
	__le16 reserved0;
	__u8 pad0[32];
	/* written by the guest at IVPosition i only */
	__u8 mac[6];		/* MAC of the guest's ivl0 */
	__le16 reserved1;
	__le32 state;		/* enum ivl_slot_state */
	__le32 seq;		/* odd while the guest rewrites mac/state/joined_gen */
	__le64 heartbeat;	/* bumped at least every IVL_HEARTBEAT_MS while UP */
	__le64 joined_gen;	/* slot generation the guest saw when it went UP */
	__le64 leave_ack;	/* bit j: slot j is LEAVING and I no longer send to it */
	__u8 pad1[24];
};				/* 128 bytes */

/*
 * srv_flags.  MAC_KNOWN: the server learned nic_mac from the occupant's
 * QEMU (its command line or the operator's map); guests send to this slot
 * only while the slot's mac equals nic_mac.  EVICTED: the server caught
 * the occupant claiming a MAC that is not its NIC's and cut it off; guests
 * treat the slot as absent.
 */
#define IVL_SLOT_F_MAC_KNOWN	0x0001U
#define IVL_SLOT_F_EVICTED	0x0002U
#define IVL_SLOT_KNOWN_FLAGS	0x0003U

/* A leaver waits this long for every UP peer's leave_ack bit. */
#define IVL_LEAVE_ACK_MS	500U

#define IVL_HEARTBEAT_MS	100U
#define IVL_HEARTBEAT_TIMEOUT_MS 1000U

/*
 * Ring i->j (producer i, consumer j) at
 *   rings_offset + (i * max_peers + j) * ring_stride:
 * a control block followed by ring_size data bytes.  prod and cons are
 * free-running byte counters (mod 2^32); prod - cons <= ring_size.
 * The server zeroes every ring to and from a slot before a new QEMU joins it.
 */
struct ivl_ring_ctrl {
	/* written by the producer only */
	__le32 prod;		/* bytes ever published */
	__u8 pad0[60];
	/* written by the consumer only */
	__le32 cons;		/* bytes ever consumed */
	__le32 need_kick;	/* 1: consumer sleeps, producer rings IVL_VEC_DATA */
	__u8 pad1[56];
	__u8 reserved[128];
};				/* 256 bytes */

/*
 * One record: this header, then @len frame bytes, padded to IVL_REC_ALIGN.
 * A record never wraps: when the space left before the ring's end is too
 * small, the producer writes an IVL_REC_PAD record there and continues at
 * the ring's start.  Since everything is 16-byte aligned, a pad header
 * always fits.
 */
struct ivl_rec_hdr {
	__le32 len;		/* frame bytes following this header */
	__le16 flags;		/* IVL_REC_* */
	__le16 gso_type;	/* IVL_GSO_* */
	__le16 gso_size;	/* MSS for GSO frames */
	__le16 csum_start;	/* from frame start, when IVL_REC_CSUM_PARTIAL */
	__le16 csum_offset;
	__le16 reserved;
};				/* 16 bytes */

#define IVL_REC_PAD		0x0001	/* filler up to the ring's end */
#define IVL_REC_CSUM_PARTIAL	0x0002	/* checksum still to be filled in */
#define IVL_REC_CSUM_VALID	0x0004	/* checksum already verified */
#define IVL_REC_KNOWN_FLAGS	0x0007

#define IVL_GSO_NONE		0
#define IVL_GSO_TCPV4		1
#define IVL_GSO_TCPV6		2
#define IVL_GSO_UDP_L4		3
#define IVL_GSO_ECN		0x80	/* or'ed into gso_type */

#endif /* IVL_ABI_H */
