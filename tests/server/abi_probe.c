// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Prints the layout of guest-driver/ivl_abi.h as the compiler sees it, one
 * fact per line, for tests/server/test_abi.py to compare with abi.py:
 *
 *   const NAME VALUE
 *   sizeof STRUCT SIZE
 *   field STRUCT FIELD OFFSET SIZE
 */
#include <stddef.h>
#include <stdio.h>

#include "ivl_abi.h"

#define CONST(name) printf("const %s %llu\n", #name, (unsigned long long)(name))
#define SIZE(s) printf("sizeof %s %zu\n", #s, sizeof(struct s))
#define FIELD(s, f) \
	printf("field %s %s %zu %zu\n", #s, #f, offsetof(struct s, f), \
	       sizeof(((struct s *)0)->f))

int main(void)
{
	CONST(IVL_MAGIC);
	CONST(IVL_ABI_VERSION);
	CONST(IVL_CACHELINE);
	CONST(IVL_HDR_SIZE);
	CONST(IVL_SLOT_SIZE);
	CONST(IVL_MAX_PEERS);
	CONST(IVL_RING_CTRL_SIZE);
	CONST(IVL_RING_MIN_SIZE);
	CONST(IVL_RING_MAX_SIZE);
	CONST(IVL_REC_ALIGN);
	CONST(IVL_MAX_FRAME);
	CONST(IVL_VEC_MEMBERSHIP);
	CONST(IVL_VEC_DATA);
	CONST(IVL_NR_VECTORS);
	CONST(IVL_REG_INTRMASK);
	CONST(IVL_REG_INTRSTATUS);
	CONST(IVL_REG_IVPOSITION);
	CONST(IVL_REG_DOORBELL);
	CONST(IVL_SLOT_F_MAC_KNOWN);
	CONST(IVL_SLOT_F_EVICTED);
	CONST(IVL_SLOT_KNOWN_FLAGS);
	CONST(IVL_LEAVE_ACK_MS);
	CONST(IVL_HEARTBEAT_MS);
	CONST(IVL_HEARTBEAT_TIMEOUT_MS);
	CONST(IVL_REC_PAD);
	CONST(IVL_REC_CSUM_PARTIAL);
	CONST(IVL_REC_CSUM_VALID);
	CONST(IVL_REC_KNOWN_FLAGS);
	CONST(IVL_GSO_NONE);
	CONST(IVL_GSO_TCPV4);
	CONST(IVL_GSO_TCPV6);
	CONST(IVL_GSO_UDP_L4);
	CONST(IVL_GSO_ECN);
	CONST(IVL_STATE_DOWN);
	CONST(IVL_STATE_UP);
	CONST(IVL_STATE_LEAVING);

	SIZE(ivl_region_hdr);
	FIELD(ivl_region_hdr, magic);
	FIELD(ivl_region_hdr, version);
	FIELD(ivl_region_hdr, region_size);
	FIELD(ivl_region_hdr, max_peers);
	FIELD(ivl_region_hdr, ring_size);
	FIELD(ivl_region_hdr, dir_offset);
	FIELD(ivl_region_hdr, slot_size);
	FIELD(ivl_region_hdr, rings_offset);
	FIELD(ivl_region_hdr, ring_stride);
	FIELD(ivl_region_hdr, generation);
	FIELD(ivl_region_hdr, nr_present);
	FIELD(ivl_region_hdr, reserved0);

	SIZE(ivl_slot);
	FIELD(ivl_slot, present);
	FIELD(ivl_slot, peer_id);
	FIELD(ivl_slot, generation);
	FIELD(ivl_slot, srv_seq);
	FIELD(ivl_slot, srv_flags);
	FIELD(ivl_slot, nic_mac);
	FIELD(ivl_slot, reserved0);
	FIELD(ivl_slot, pad0);
	FIELD(ivl_slot, mac);
	FIELD(ivl_slot, reserved1);
	FIELD(ivl_slot, state);
	FIELD(ivl_slot, seq);
	FIELD(ivl_slot, heartbeat);
	FIELD(ivl_slot, joined_gen);
	FIELD(ivl_slot, leave_ack);
	FIELD(ivl_slot, pad1);

	SIZE(ivl_ring_ctrl);
	FIELD(ivl_ring_ctrl, prod);
	FIELD(ivl_ring_ctrl, pad0);
	FIELD(ivl_ring_ctrl, cons);
	FIELD(ivl_ring_ctrl, need_kick);
	FIELD(ivl_ring_ctrl, pad1);
	FIELD(ivl_ring_ctrl, reserved);

	SIZE(ivl_rec_hdr);
	FIELD(ivl_rec_hdr, len);
	FIELD(ivl_rec_hdr, flags);
	FIELD(ivl_rec_hdr, gso_type);
	FIELD(ivl_rec_hdr, gso_size);
	FIELD(ivl_rec_hdr, csum_start);
	FIELD(ivl_rec_hdr, csum_offset);
	FIELD(ivl_rec_hdr, reserved);
	return 0;
}
