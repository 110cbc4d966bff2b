// SPDX-License-Identifier: GPL-2.0
/*
 * ivloop upper device: ivl0, stacked on the guest's NIC.
 *
 * Transmit, per frame (net_failover's shape): a unicast destination that
 * belongs to a usable peer goes into that peer's ring; everything else goes
 * to the lower NIC with dev_queue_xmit().
 *
 * Locking: one TX queue and no LLTX, so the core's TX queue lock serialises
 * ndo_start_xmit and makes it the single producer of every ring we write.
 * The TX flow-control timer, NAPI's wake check and ring re-attachment take
 * the same lock.  The peer table is read under RCU (rcu_read_lock_bh in
 * xmit, rcu_read_lock in NAPI).
 *
 * Flow control: the queue is stopped as soon as the ring just written lacks
 * room for one more maximal frame, so a frame that is handed to us always
 * fits and NETDEV_TX_BUSY is never needed.  Ring consumers only ask for
 * doorbells when they go idle, so the producer has no doorbell of its own
 * for "room again".  Two things wake the queue, whichever comes first:
 *  - the consumer: when it reads a ring that was nearly full (fill above
 *    size - 2 maximal records, the most a stopped producer can be waiting
 *    for) it rings our data vector after freeing space; our NAPI then runs
 *    the wake check.  This is the fast path and needs no ABI field.
 *  - a soft hrtimer polling the ring, 20 us doubling to 1 ms.  It is what
 *    makes progress certain even when a doorbell is lost or the peer does
 *    not send one, and after stall_ms it gives up on the peer: the peer is
 *    marked stalled and its frames take the lower path until its ring has
 *    room again.
 * Receive: frames from the lower NIC arrive through an rx_handler; frames
 * from rings through NAPI, scheduled by the data vector.
 */
#include <linux/ethtool.h>
#include <linux/highmem.h>
#include <linux/if_arp.h>
#include <linux/if_vlan.h>
#include <linux/ip.h>
#include <linux/skbuff.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <net/tcp.h>

#include "ivl.h"
#include "ivl_meta.h"

#define IVL_FEATURES	(NETIF_F_SG | NETIF_F_FRAGLIST | NETIF_F_HW_CSUM | \
			 NETIF_F_HIGHDMA | NETIF_F_RXCSUM | NETIF_F_TSO | \
			 NETIF_F_TSO6 | NETIF_F_TSO_ECN | NETIF_F_GSO_UDP_L4)
/*
 * VLAN IDs go down to the lower NIC's filter (virtio-net drops tagged
 * frames whose VID it was never told); tags stay in the frame data, so
 * tagged frames cross rings like any other.
 */
#define IVL_VLAN_FEATURES (NETIF_F_HW_VLAN_CTAG_FILTER | \
			   NETIF_F_HW_VLAN_STAG_FILTER)

/* GSO types a record can carry; others go to the lower NIC. */
#define IVL_SKB_GSO_OK	(SKB_GSO_TCPV4 | SKB_GSO_TCPV6 | SKB_GSO_TCP_ECN | \
			 SKB_GSO_UDP_L4 | SKB_GSO_DODGY)

/* Two maximal records: the most room a stopped producer waits for. */
#define IVL_SPACE_KICK_MARGIN \
	(2 * ALIGN(sizeof(struct ivl_rec_hdr) + IVL_MAX_FRAME, IVL_REC_ALIGN))

/* ------------------------------------------------------------------ */
/* counters                                                           */

struct ivl_stat_desc {
	char name[ETH_GSTRING_LEN];
	size_t off;
};

#define IVL_STAT(f) { #f, offsetof(struct ivl_stats, f) }

static const struct ivl_stat_desc ivl_stat_descs[] = {
	IVL_STAT(shm_tx_packets),
	IVL_STAT(shm_tx_bytes),
	IVL_STAT(shm_rx_packets),
	IVL_STAT(shm_rx_bytes),
	IVL_STAT(lower_tx_packets),
	IVL_STAT(lower_tx_bytes),
	IVL_STAT(lower_rx_packets),
	IVL_STAT(lower_rx_bytes),
	IVL_STAT(doorbells_sent),
	IVL_STAT(doorbells_suppressed),
	IVL_STAT(space_kicks_sent),
	IVL_STAT(ring_full),
	IVL_STAT(tx_wakeups),
	IVL_STAT(tx_no_room),
	IVL_STAT(tx_stalled_lower),
	IVL_STAT(tx_foreign_src),
	IVL_STAT(tx_offload_lower),
	IVL_STAT(tx_lower_drops),
	IVL_STAT(tx_bad_ring),
	IVL_STAT(rx_bad_record),
	IVL_STAT(rx_bad_offload),
	IVL_STAT(rx_runt),
	IVL_STAT(rx_alloc_fail),
	IVL_STAT(rx_lower_drops),
	IVL_STAT(rx_bad_src),
	IVL_STAT(rx_leave_lost),
	IVL_STAT(leave_ack_timeouts),
	IVL_STAT(peer_up),
	IVL_STAT(peer_down),
	IVL_STAT(peer_timeout),
	IVL_STAT(peer_stalled),
	IVL_STAT(peer_bad_entry),
	IVL_STAT(peer_bad_mac),
	IVL_STAT(poll_windows),
	IVL_STAT(poll_hits),
	IVL_STAT(poll_starved),
	IVL_STAT(poll_watchdog),
};

#define IVL_NR_STATS	ARRAY_SIZE(ivl_stat_descs)
#define IVL_IDX(f)	(offsetof(struct ivl_stats, f) / sizeof(u64_stats_t))

static const char ivl_priv_flag_names[][ETH_GSTRING_LEN] = {
	[IVL_F_FORCE_LOWER] = "force-lower",
};

/* Sum the per-CPU counters; @sum has IVL_NR_STATS slots in table order. */
static void ivl_stats_sum(const struct ivl_priv *priv, u64 *sum)
{
	u64 snap[IVL_NR_STATS];
	unsigned int start, i;
	int cpu;

	BUILD_BUG_ON(sizeof(struct ivl_stats) !=
		     IVL_NR_STATS * sizeof(u64_stats_t));
	memset(sum, 0, IVL_NR_STATS * sizeof(*sum));
	for_each_possible_cpu(cpu) {
		const struct ivl_pcpu_stats *ps = per_cpu_ptr(priv->stats, cpu);

		do {
			start = u64_stats_fetch_begin(&ps->syncp);
			for (i = 0; i < IVL_NR_STATS; i++)
				snap[i] = u64_stats_read((const u64_stats_t *)
					((const u8 *)&ps->s + ivl_stat_descs[i].off));
		} while (u64_stats_fetch_retry(&ps->syncp, start));
		for (i = 0; i < IVL_NR_STATS; i++)
			sum[i] += snap[i];
	}
}

static void ivl_get_stats64(struct net_device *dev,
			    struct rtnl_link_stats64 *st)
{
	struct ivl_priv *priv = netdev_priv(dev);
	u64 v[IVL_NR_STATS];

	ivl_stats_sum(priv, v);
	st->tx_packets = v[IVL_IDX(shm_tx_packets)] + v[IVL_IDX(lower_tx_packets)];
	st->tx_bytes = v[IVL_IDX(shm_tx_bytes)] + v[IVL_IDX(lower_tx_bytes)];
	st->rx_packets = v[IVL_IDX(shm_rx_packets)] + v[IVL_IDX(lower_rx_packets)];
	st->rx_bytes = v[IVL_IDX(shm_rx_bytes)] + v[IVL_IDX(lower_rx_bytes)];
	st->tx_dropped = v[IVL_IDX(tx_lower_drops)];
	st->rx_dropped = v[IVL_IDX(rx_alloc_fail)] + v[IVL_IDX(rx_lower_drops)] +
			 v[IVL_IDX(rx_bad_src)] + v[IVL_IDX(rx_leave_lost)];
	st->rx_errors = v[IVL_IDX(rx_bad_record)] + v[IVL_IDX(rx_bad_offload)] +
			v[IVL_IDX(rx_runt)];
	st->rx_length_errors = v[IVL_IDX(rx_runt)];
	st->tx_errors = v[IVL_IDX(tx_bad_ring)];
}

/* ------------------------------------------------------------------ */
/* copies                                                             */

/*
 * Copy with 8-byte loads and stores, unrolled.  Under TCG every string
 * instruction is emulated one iteration at a time: "rep movsb" (memcpy()
 * with ERMS) a byte per iteration, 0.25-0.4 GB/s; "rep movsq" (memcpy()
 * with erms=off, as the harness boots guests) 8 bytes per iteration, still
 * slower than this loop: iperf3 over shm lost 10-25% with memcpy() here
 * (AMD EPYC host, 2026-12-01).  On hardware it is about as fast as the
 * kernel's unrolled memcpy_orig.  Both copies of the shared path (skb to
 * ring, ring to skb) use it.
 */
static void ivl_copy(void *dst, const void *src, size_t len)
{
	u64 *d = dst;
	const u64 *s = src;
	u64 a, b, c, e;

	while (len >= 32) {
		a = get_unaligned(s);
		b = get_unaligned(s + 1);
		c = get_unaligned(s + 2);
		e = get_unaligned(s + 3);
		put_unaligned(a, d);
		put_unaligned(b, d + 1);
		put_unaligned(c, d + 2);
		put_unaligned(e, d + 3);
		d += 4;
		s += 4;
		len -= 32;
		/* keeps the compiler from turning the loop into memcpy() */
		barrier();
	}
	while (len >= 8) {
		put_unaligned(get_unaligned(s), d);
		d++;
		s++;
		len -= 8;
		barrier();
	}
	if (len)
		memcpy(d, s, len);
}

/* Copy @skb (no frag_list) to @dst. */
static void ivl_copy_from_skb(u8 *dst, const struct sk_buff *skb)
{
	const struct skb_shared_info *si = skb_shinfo(skb);
	u32 p_off, p_len, copied;
	const skb_frag_t *f;
	struct page *p;
	void *va;
	int i;

	ivl_copy(dst, skb->data, skb_headlen(skb));
	dst += skb_headlen(skb);
	for (i = 0; i < si->nr_frags; i++) {
		f = &si->frags[i];
		skb_frag_foreach_page(f, skb_frag_off(f), skb_frag_size(f),
				      p, p_off, p_len, copied) {
			va = kmap_local_page(p);
			ivl_copy(dst, va + p_off, p_len);
			kunmap_local(va);
			dst += p_len;
		}
	}
}

/* ------------------------------------------------------------------ */
/* transmit                                                           */

/*
 * Offload metadata for @skb, or false when a record cannot carry it: when
 * the receiver would refuse it (ivl_meta_check(), the rule both ends
 * apply), the frame goes lower instead of vanishing.
 */
static bool ivl_tx_meta(const struct sk_buff *skb, struct ivl_rec_meta *m)
{
	const struct skb_shared_info *si = skb_shinfo(skb);
	u8 buf[IVL_META_HDR_MAX];
	const u8 *hdr;
	u32 hlen;
	int start;

	memset(m, 0, sizeof(*m));
	if (skb_is_gso(skb)) {
		if (si->gso_type & ~IVL_SKB_GSO_OK ||
		    skb->ip_summed != CHECKSUM_PARTIAL)
			return false;
		if (si->gso_type & SKB_GSO_TCPV4)
			m->gso_type = IVL_GSO_TCPV4;
		else if (si->gso_type & SKB_GSO_TCPV6)
			m->gso_type = IVL_GSO_TCPV6;
		else if (si->gso_type & SKB_GSO_UDP_L4)
			m->gso_type = IVL_GSO_UDP_L4;
		else
			return false;
		if (si->gso_type & SKB_GSO_TCP_ECN) {
			if (m->gso_type == IVL_GSO_UDP_L4)
				return false;
			m->gso_type |= IVL_GSO_ECN;
		}
		m->gso_size = si->gso_size;
	}

	if (skb->ip_summed == CHECKSUM_PARTIAL) {
		start = skb_checksum_start_offset(skb);
		/*
		 * The receiver wants the checksum field, and a GSO frame's
		 * transport header, in the linear part it builds (see
		 * ivl_rx_csum_end()); headers that long go lower instead.
		 */
		if (start < 0 ||
		    start + max_t(u32, skb->csum_offset + sizeof(__sum16),
				  sizeof(struct tcphdr)) > IVL_RX_HEAD ||
		    start + skb->csum_offset + sizeof(__sum16) > skb->len)
			return false;
		m->flags = IVL_REC_CSUM_PARTIAL;
		m->csum_start = start;
		m->csum_offset = skb->csum_offset;
	} else if (skb->ip_summed == CHECKSUM_UNNECESSARY) {
		m->flags = IVL_REC_CSUM_VALID;
	}
	if (!(m->flags & IVL_REC_CSUM_PARTIAL))
		return true;
	/* the headers are linear in practice: no copy then */
	hlen = min_t(u32, skb->len, IVL_META_HDR_MAX);
	hdr = skb_header_pointer(skb, 0, hlen, buf);
	return hdr && !ivl_meta_check(hdr, hlen, skb->len, m);
}

/*
 * The table entry for @skb's destination, or NULL.  Under
 * rcu_read_lock_bh.  A peer takes only frames from the MAC we published
 * (the server vouches for it): frames to a peer from any other source (a
 * container's macvlan, a bridge's own address) go lower, *@foreign says.
 */
static struct ivl_peer *ivl_route_lookup(struct ivl_priv *priv,
					 struct ivl_shm *shm,
					 const struct sk_buff *skb,
					 bool *foreign)
{
	const struct ivl_peer_table *t;
	const u8 *dest = skb->data;
	unsigned int i;

	*foreign = false;
	if (test_bit(IVL_F_FORCE_LOWER, &priv->flags))
		return NULL;
	t = ivl_table_rcu_bh(shm);
	if (!t || !t->nr_tx || skb_headlen(skb) < ETH_HLEN ||
	    !is_unicast_ether_addr(dest))
		return NULL;
	for (i = 0; i < t->nr_tx; i++) {
		/* reads 8 bytes: the skb has a full header, routes are padded */
		if (!ether_addr_equal_64bits(dest, t->tx[i].mac))
			continue;
		/* the source: bytes 6-13 of the header, the table's is padded */
		if (unlikely(!ether_addr_equal_64bits(dest + ETH_ALEN, t->src))) {
			*foreign = true;
			return NULL;
		}
		return t->tx[i].peer;
	}
	return NULL;
}

/*
 * Which queue @skb waits in: its peer's while that peer can take frames,
 * else the lower NIC's.  A stalled or broken peer's frames thus never
 * wait behind its ring.  dev_queue_xmit() calls this under
 * rcu_read_lock_bh, but af_packet's PACKET_QDISC_BYPASS from process
 * context: take our own (it nests), which also keeps the per-CPU
 * counters' BH rule.
 */
static u16 ivl_select_queue(struct net_device *dev, struct sk_buff *skb,
			    struct net_device *sb_dev)
{
	struct ivl_priv *priv = netdev_priv(dev);
	u16 qid = IVL_TXQ_LOWER;
	struct ivl_peer *peer = NULL;
	struct ivl_shm *shm;
	bool foreign;

	rcu_read_lock_bh();
	shm = ivl_shm_rcu_bh(priv);
	if (shm)
		peer = ivl_route_lookup(priv, shm, skb, &foreign);
	if (peer && ivl_peer_usable_tx(peer))
		qid = ivl_peer_qid(priv, peer->id);
	else if (peer)
		ivl_stat_inc(priv, tx_stalled_lower);
	else if (shm && foreign)
		ivl_stat_inc(priv, tx_foreign_src);
	rcu_read_unlock_bh();
	return qid;
}

/* Peer TX queue lock held.  Ring the doorbell deferred by xmit_more. */
static void ivl_tx_kick_flush(struct ivl_priv *priv, struct ivl_shm *shm,
			      struct ivl_peer *peer)
{
	if (!peer->kick_pending)
		return;
	peer->kick_pending = false;
	if (ivl_ring_need_kick(&peer->tx)) {
		/* peer->id is the slot; QEMU rings by peer ID */
		ivl_doorbell(shm, peer->peer_id, IVL_VEC_DATA);
		ivl_stat_inc(priv, doorbells_sent);
	} else {
		ivl_stat_inc(priv, doorbells_suppressed);
	}
}

/*
 * Peer TX queue lock held.  Start the queue again if the reason it was
 * stopped is gone: room in the ring, or the peer no longer in use.  After
 * stall_ms without room the peer is marked stalled: what waits in its
 * queue then goes lower, and so does what follows (ivl_select_queue()).
 */
static void ivl_tx_wake_peer_locked(struct ivl_priv *priv,
				    struct ivl_peer *peer)
{
	unsigned long stall = msecs_to_jiffies(ivl_param_stall_ms);

	if (!peer->tx_stopped)
		return;
	if (!test_bit(IVL_F_FORCE_LOWER, &priv->flags) &&
	    ivl_peer_usable_tx(peer) && READ_ONCE(peer->tx_on) &&
	    !ivl_ring_has_room(&peer->tx, IVL_MAX_FRAME)) {
		if (!time_after(jiffies, peer->stop_since + stall))
			return;
		ivl_peer_stalled(priv, peer, "ring full");
	}
	WRITE_ONCE(peer->tx_stopped, false);
	ivl_stat_inc(priv, tx_wakeups);
	netif_tx_wake_queue(ivl_peer_txq(priv, peer));
}

static void ivl_tx_wake_peer(struct ivl_priv *priv, struct ivl_peer *peer)
{
	struct netdev_queue *txq = ivl_peer_txq(priv, peer);

	__netif_tx_lock_bh(txq);
	ivl_tx_wake_peer_locked(priv, peer);
	__netif_tx_unlock_bh(txq);
}

/* Any context but hard IRQ: check every stopped peer queue. */
void ivl_tx_wake_check(struct ivl_priv *priv, struct ivl_shm *shm)
{
	u32 id;

	for (id = 0; id < shm->max_peers; id++)
		if (READ_ONCE(shm->peers[id].tx_stopped))
			ivl_tx_wake_peer(priv, &shm->peers[id]);
}

static ktime_t ivl_us(u32 us)
{
	return ns_to_ktime((u64)us * NSEC_PER_USEC);
}

enum hrtimer_restart ivl_tx_timer_fn(struct hrtimer *timer)
{
	struct ivl_peer *peer = container_of(timer, struct ivl_peer, tx_timer);
	/* cancelled before shm->priv is cleared (ivl_tx_flow_reset()) */
	struct ivl_priv *priv = READ_ONCE(peer->shm->priv);
	enum hrtimer_restart ret = HRTIMER_NORESTART;
	struct netdev_queue *txq;

	if (!priv)
		return ret;
	txq = ivl_peer_txq(priv, peer);
	/* soft hrtimer: softirq context, BH already disabled */
	__netif_tx_lock(txq, smp_processor_id());
	ivl_tx_wake_peer_locked(priv, peer);
	/*
	 * Still stopped: poll again, later.  If xmit re-armed the timer
	 * while we waited for the lock, that arming stands.
	 */
	if (peer->tx_stopped && !hrtimer_is_queued(timer)) {
		peer->stop_backoff_us = min(peer->stop_backoff_us * 2,
					    IVL_TX_POLL_MAX_US);
		hrtimer_forward_now(timer, ivl_us(peer->stop_backoff_us));
		ret = HRTIMER_RESTART;
	}
	__netif_tx_unlock(txq);
	return ret;
}

/*
 * Does @txq have a qdisc of its own?  Under the default mq root every
 * queue does.  A classful root (htb, tbf, cake: what rate limiters
 * install) or noqueue is one qdisc for all queues: it stops dequeuing
 * when the queue of its next frame is stopped, so one full ring would
 * hold every other flow, the lower NIC's included.
 */
static bool ivl_txq_own_qdisc(struct ivl_priv *priv, struct netdev_queue *txq)
{
	struct netdev_queue *lower = netdev_get_tx_queue(priv->dev,
							 IVL_TXQ_LOWER);

	return rcu_access_pointer(txq->qdisc) !=
	       rcu_access_pointer(lower->qdisc);
}

/*
 * Peer TX queue lock held.  @peer's ring cannot take another maximal frame.
 * Behind a shared qdisc the queue keeps running: frames that find the
 * ring full go lower (tx_no_room) until it has room, and a peer that
 * stops reading is bypassed after stall_ms as ever.
 */
static void ivl_tx_stop(struct ivl_priv *priv, struct ivl_shm *shm,
			struct ivl_peer *peer, struct netdev_queue *txq)
{
	if (!ivl_txq_own_qdisc(priv, txq)) {
		ivl_tx_kick_flush(priv, shm, peer);
		return;
	}
	netif_tx_stop_queue(txq);
	WRITE_ONCE(peer->tx_stopped, true);
	peer->stop_since = jiffies;
	peer->stop_backoff_us = IVL_TX_POLL_MIN_US;
	ivl_stat_inc(priv, ring_full);
	/* a consumer that went idle must hear about what is waiting */
	ivl_tx_kick_flush(priv, shm, peer);
	/*
	 * The consumer may have made room since our has_room(); its space
	 * kick then found the queue running.  Recheck now that the stop is
	 * recorded (has_room reads cons with acquire).
	 */
	if (ivl_ring_has_room(&peer->tx, IVL_MAX_FRAME)) {
		WRITE_ONCE(peer->tx_stopped, false);
		netif_tx_start_queue(txq);
		return;
	}
	hrtimer_start(&peer->tx_timer, ivl_us(IVL_TX_POLL_MIN_US),
		      HRTIMER_MODE_REL_SOFT);
}

/* Peer TX queue lock held.  False: not sent, the caller sends @skb lower. */
static bool ivl_xmit_shm(struct ivl_priv *priv, struct ivl_shm *shm,
			 struct ivl_peer *peer, struct sk_buff *skb,
			 struct netdev_queue *txq, bool more)
{
	struct ivl_ring *r = &peer->tx;
	struct ivl_rec_meta meta;
	u32 len = skb->len;
	void *buf;

	if (unlikely(len > IVL_MAX_FRAME || !ivl_tx_meta(skb, &meta))) {
		ivl_stat_inc(priv, tx_offload_lower);
		return false;
	}
	buf = ivl_ring_reserve(r, len);
	if (unlikely(!buf)) {
		/*
		 * The queue stops before this, so only a broken ring, or a
		 * full one whose queue another peer's room restarted (shared
		 * queues), gets here.
		 */
		ivl_stat_inc(priv, tx_no_room);
		if (ivl_ring_check_producer(r)) {
			ivl_stat_inc(priv, tx_bad_ring);
			ivl_peer_broken(peer, "bad consumer index in our ring");
		}
		return false;
	}
	/* the one copy on this side; an abandoned reservation is harmless */
	if (unlikely(skb_has_frag_list(skb))) {
		if (WARN_ON_ONCE(skb_copy_bits(skb, 0, buf, len)))
			return false;
	} else {
		ivl_copy_from_skb(buf, skb);
	}
	ivl_ring_commit(r, len, &meta);
	skb_tx_timestamp(skb);

	ivl_stat_inc(priv, shm_tx_packets);
	ivl_stat_add(priv, shm_tx_bytes, len);
	ivl_peer_stat_add(&peer->tx_stats, len);
	/* one doorbell per batch */
	peer->kick_pending = true;
	if (!more)
		ivl_tx_kick_flush(priv, shm, peer);
	ivl_poll_tx(priv);

	if (unlikely(!ivl_ring_has_room(r, IVL_MAX_FRAME)))
		ivl_tx_stop(priv, shm, peer, txq);
	dev_consume_skb_any(skb);
	return true;
}

static void ivl_xmit_lower(struct ivl_priv *priv, struct sk_buff *skb)
{
	unsigned int len = skb->len;
	int ret;

	/* the lower device checks features: it segments what it cannot TSO */
	skb->dev = priv->lower;
	ret = dev_queue_xmit(skb);
	if (likely(ret == NET_XMIT_SUCCESS || ret == NET_XMIT_CN)) {
		ivl_stat_inc(priv, lower_tx_packets);
		ivl_stat_add(priv, lower_tx_bytes, len);
	} else {
		ivl_stat_inc(priv, tx_lower_drops);
	}
}

/* Queue @qid's lock held: ring what its peers' batches deferred. */
static void ivl_tx_kick_flush_queue(struct ivl_priv *priv, struct ivl_shm *shm,
				    u16 qid)
{
	u32 id, nq = priv->dev->real_num_tx_queues - IVL_TXQ_PEER0;

	for (id = qid - IVL_TXQ_PEER0; id < shm->max_peers; id += nq)
		ivl_tx_kick_flush(priv, shm, &shm->peers[id]);
}

/*
 * Queue 0 goes lower.  A peer queue's lock is the one producer lock of
 * its peer's ring: the frame goes into the ring only if the table still
 * routes it to a peer of this queue (it may have changed since
 * select_queue).
 */
static netdev_tx_t ivl_start_xmit(struct sk_buff *skb, struct net_device *dev)
{
	struct ivl_priv *priv = netdev_priv(dev);
	struct ivl_shm *shm = ivl_shm_rcu_bh(priv);
	/* before dev_queue_xmit() to the lower NIC, which sets its own */
	bool more = netdev_xmit_more();
	u16 qid = skb_get_queue_mapping(skb);
	struct netdev_queue *txq = netdev_get_tx_queue(dev, qid);
	struct ivl_peer *peer = NULL;
	bool foreign;

	if (shm && qid != IVL_TXQ_LOWER) {
		/* select_queue counted a foreign source; it is rare here */
		peer = ivl_route_lookup(priv, shm, skb, &foreign);
		if (peer && ivl_peer_qid(priv, peer->id) != qid) {
			peer = NULL;
		} else if (peer && !ivl_peer_usable_tx(peer)) {
			/* queued before the peer was marked stalled */
			ivl_stat_inc(priv, tx_stalled_lower);
			peer = NULL;
		}
	}
	if (!peer || !ivl_xmit_shm(priv, shm, peer, skb, txq, more))
		ivl_xmit_lower(priv, skb);
	/* a batch that ended with a frame sent lower still rings once */
	if (shm && qid != IVL_TXQ_LOWER && !more)
		ivl_tx_kick_flush_queue(priv, shm, qid);
	return NETDEV_TX_OK;
}

/* ------------------------------------------------------------------ */
/* receive from rings                                                 */

/*
 * A page for @want bytes of a frame, of *@order.  Full-size chunks come
 * from the page pool: the stack gives them back when it frees the skb, so
 * they are not zeroed again (init_on_alloc zeroes every fresh page, a third
 * of the receive cost under TCG).  Smaller ones, and any when the pool is
 * dry, from the page allocator.  BH disabled, one caller at a time per
 * pool (the peer's NAPI, or the drain with NAPI disabled): the pool's fast
 * path needs that, hence a pool per peer.
 */
static struct page *ivl_rx_page(struct ivl_peer *peer, u32 want, u32 *order,
				bool *pooled)
{
	struct page *page = NULL;

	*order = min_t(u32, get_order(want), IVL_RX_ORDER);
	*pooled = false;
	if (*order == IVL_RX_ORDER && peer->rx_pool) {
		page = page_pool_dev_alloc_pages(peer->rx_pool);
		if (page) {
			*pooled = true;
			return page;
		}
	}
	if (*order)
		page = __dev_alloc_pages(GFP_ATOMIC | __GFP_NOWARN |
					 __GFP_NORETRY | __GFP_NOMEMALLOC,
					 *order);
	if (!page) {
		*order = 0;
		page = dev_alloc_page();
	}
	return page;
}

/*
 * One copy out of the ring: linear for small frames, else the headers
 * linear and the rest in compound pages (order-0 pages when those fail).
 */
static struct sk_buff *ivl_rx_build_skb(struct ivl_priv *priv,
					struct ivl_peer *peer,
					struct napi_struct *napi,
					const u8 *data, u32 len)
{
	u32 head = len <= IVL_RX_LINEAR_MAX ? len : IVL_RX_HEAD;
	struct sk_buff *skb;
	struct page *page;
	u32 off, chunk, order;
	bool pooled;
	int i;

	BUILD_BUG_ON(DIV_ROUND_UP(IVL_MAX_FRAME - IVL_RX_HEAD, PAGE_SIZE) >
		     MAX_SKB_FRAGS);
	if (napi)
		skb = napi_alloc_skb(napi, head);
	else
		skb = netdev_alloc_skb_ip_align(priv->dev, head);
	if (!skb)
		return NULL;
	ivl_copy(skb_put(skb, head), data, head);

	for (off = head, i = 0; off < len; off += chunk, i++) {
		/* a 64 KiB frame in 2-3 allocations rather than 16 */
		page = ivl_rx_page(peer, len - off, &order, &pooled);
		if (!page) {
			kfree_skb(skb);
			return NULL;
		}
		/*
		 * Freeing the skb returns pool pages to the pool (it tells
		 * them apart page by page); other pages are put as usual.
		 */
		if (pooled)
			skb_mark_for_recycle(skb);
		chunk = min_t(u32, len - off, PAGE_SIZE << order);
		ivl_copy(page_address(page), data + off, chunk);
		skb_add_rx_frag(skb, i, page, 0, chunk, PAGE_SIZE << order);
	}
	return skb;
}

/*
 * Rebuild checksum and GSO state from a record (skb->data at the MAC
 * header).  Modelled on virtio_net_hdr_to_skb(); values are the ring's
 * checked local copies but still the peer's word, hence SKB_GSO_DODGY.
 */
static int ivl_rx_offload(struct sk_buff *skb, const struct ivl_rec_meta *m)
{
	struct skb_shared_info *si = skb_shinfo(skb);
	u32 hlen = min_t(u32, skb_headlen(skb), IVL_META_HDR_MAX);
	u32 type = 0, thlen = 0, check = 0, start, off, needed, p_off;
	u16 gso_size = m->gso_size;

	/* the sender checked the same (ivl_tx_meta()): only a liar fails */
	if (ivl_meta_check(skb->data, hlen, skb->len, m))
		return -EINVAL;
	switch (m->gso_type & ~IVL_GSO_ECN) {
	case IVL_GSO_NONE:
		break;
	case IVL_GSO_TCPV4:
	case IVL_GSO_TCPV6:
		type = (m->gso_type & ~IVL_GSO_ECN) == IVL_GSO_TCPV4 ?
		       SKB_GSO_TCPV4 : SKB_GSO_TCPV6;
		thlen = sizeof(struct tcphdr);
		check = offsetof(struct tcphdr, check);
		gso_size = max_t(u16, gso_size, TCP_MIN_GSO_SIZE);
		break;
	case IVL_GSO_UDP_L4:
		type = SKB_GSO_UDP_L4;
		thlen = sizeof(struct udphdr);
		check = offsetof(struct udphdr, check);
		break;
	default:
		return -EINVAL;
	}
	if (m->gso_type & IVL_GSO_ECN)
		type |= SKB_GSO_TCP_ECN;

	if (m->flags & IVL_REC_CSUM_PARTIAL) {
		start = m->csum_start;
		off = m->csum_offset;
		needed = start + max_t(u32, thlen, off + sizeof(__sum16));
		/*
		 * Within the linear head we built: no pull (a peer could
		 * otherwise make us linearise 64 KiB per frame), and nothing
		 * for skb_partial_csum_set() to warn about.
		 */
		if (needed > skb_headlen(skb) ||
		    !skb_partial_csum_set(skb, start, off))
			return -EINVAL;
	} else if (type) {
		/* a GSO frame always leaves its checksum to the device */
		return -EINVAL;
	} else if ((m->flags & IVL_REC_CSUM_VALID) &&
		   (skb->dev->features & NETIF_F_RXCSUM)) {
		/* skb->dev: ivl0, set by the skb allocation */
		/* with rx-checksumming off, the stack verifies it */
		skb->ip_summed = CHECKSUM_UNNECESSARY;
	}

	if (!type)
		return 0;
	if (skb->csum_offset != check || gso_size == GSO_BY_FRAGS)
		return -EINVAL;
	p_off = skb_transport_offset(skb) + thlen;
	/* too small to be GSO: deliver as a plain frame */
	if (skb->len - p_off > gso_size) {
		si->gso_size = gso_size;
		si->gso_type = type | SKB_GSO_DODGY;
		si->gso_segs = 0;
	}
	return 0;
}

static void ivl_rx_deliver(struct ivl_priv *priv, struct ivl_peer *peer,
			   const struct ivl_rec *rec, struct napi_struct *napi)
{
	u32 len = rec->len;	/* <= IVL_MAX_FRAME, checked by the ring */
	struct sk_buff *skb;

	if (unlikely(len < ETH_HLEN)) {
		ivl_stat_inc(priv, rx_runt);
		return;
	}
	skb = ivl_rx_build_skb(priv, peer, napi, rec->data, len);
	if (unlikely(!skb)) {
		ivl_stat_inc(priv, rx_alloc_fail);
		return;
	}
	/*
	 * Checked on our copy.  Any member can write any ring, but a frame
	 * in this one that claims another sender is not its owner's.
	 */
	if (unlikely(!ether_addr_equal(((struct ethhdr *)skb->data)->h_source,
				       peer->rx_mac))) {
		ivl_stat_inc(priv, rx_bad_src);
		kfree_skb(skb);
		return;
	}
	if (unlikely(ivl_rx_offload(skb, &rec->meta))) {
		ivl_stat_inc(priv, rx_bad_offload);
		kfree_skb(skb);
		return;
	}
	skb->protocol = eth_type_trans(skb, priv->dev);

	ivl_stat_inc(priv, shm_rx_packets);
	ivl_stat_add(priv, shm_rx_bytes, len);
	ivl_peer_stat_add(&peer->rx_stats, len);
	if (napi)
		napi_gro_receive(napi, skb);
	else
		netif_receive_skb(skb);
}

/*
 * Read up to @budget records from @peer's ring to us.  NAPI context, or
 * process context with BH disabled and NAPI disabled (@napi == NULL).
 */
static int ivl_rx_ring(struct ivl_priv *priv, struct ivl_peer *peer,
		       struct napi_struct *napi, int budget)
{
	struct ivl_ring *r = &peer->rx;
	u32 busy = r->size - IVL_SPACE_KICK_MARGIN;
	bool space_kick = false;
	struct ivl_rec rec;
	int n = 0, err;

	BUILD_BUG_ON(IVL_RING_MIN_SIZE <= IVL_SPACE_KICK_MARGIN);
	if (test_bit(IVL_PEER_BROKEN, &peer->flags))
		return 0;
	if (peer->rx_armed) {
		/* we are polling: the producer need not ring */
		ivl_ring_disable_kick(r);
		peer->rx_armed = false;
	}
	while (n < budget) {
		err = ivl_ring_peek(r, &rec);
		if (err == -EAGAIN)
			break;
		if (unlikely(err)) {
			ivl_stat_inc(priv, rx_bad_record);
			ivl_peer_broken(peer, "bad record in its ring");
			break;
		}
		/* r->other is the prod just read: was the producer near full? */
		if (r->other - r->cons > busy)
			space_kick = true;
		ivl_rx_deliver(priv, peer, &rec, napi);
		ivl_ring_consume(r, &rec);
		n++;
	}
	if (space_kick) {
		ivl_doorbell(peer->shm, peer->peer_id, IVL_VEC_DATA);
		ivl_stat_inc(priv, space_kicks_sent);
	}
	return n;
}

/* Ask @p's ring for a kick; true if records raced in. */
static bool ivl_rx_rearm(struct ivl_peer *p)
{
	if (test_bit(IVL_PEER_BROKEN, &p->flags))
		return false;
	p->rx_armed = true;
	return ivl_ring_enable_kick(&p->rx);
}

/*
 * One NAPI instance per peer, so rings from different peers can be read
 * on different CPUs (threaded NAPI lets the scheduler spread them) and a
 * busy peer's budget is its own.
 */
static int ivl_napi_poll(struct napi_struct *napi, int budget)
{
	struct ivl_peer *peer = container_of(napi, struct ivl_peer, napi);
	struct ivl_priv *priv = netdev_priv(napi->dev);
	const struct ivl_peer_table *t = NULL;
	struct ivl_shm *shm;
	bool listed = false;
	int done = 0;

	/* the data vector also means "room again" in our ring to it */
	if (READ_ONCE(peer->tx_stopped))
		ivl_tx_wake_peer(priv, peer);

	rcu_read_lock();
	shm = ivl_shm_rcu(priv);
	if (shm)
		t = ivl_table_rcu(shm);
	/* only a published table guarantees the ring does not change */
	listed = t && (t->rx_map & BIT_ULL(peer->id));
	if (listed)
		done = ivl_rx_ring(priv, peer, napi, budget);
	if (done)
		ivl_poll_rx(priv);
	/*
	 * Re-arm the kick only when NAPI really stops: with
	 * napi_defer_hard_irqs and gro_flush_timeout set, a timer polls
	 * again instead and the producer need not ring; while the ring
	 * poller watches, it schedules us.  Records that raced with the
	 * re-arm are polled at once.  The flag test pairs with the barrier
	 * after the poller clears it.
	 */
	if (done < budget && napi_complete_done(napi, done) && listed &&
	    !test_bit(IVL_F_POLLING, &priv->flags) && ivl_rx_rearm(peer))
		napi_schedule(napi);
	rcu_read_unlock();
	return done;
}

/*
 * Schedule the NAPI of every peer in the table; @only_busy: only those
 * with records waiting or a stopped queue (the data vector does not say
 * which peer rang).  Any context; BH is re-enabled by the callers that
 * need the softirq to run.
 */
void ivl_napi_schedule_rx(struct ivl_priv *priv, struct ivl_shm *shm,
			  bool only_busy)
{
	const struct ivl_peer_table *t;
	struct ivl_peer *p;
	unsigned int i;

	rcu_read_lock();
	t = ivl_table_rcu(shm);
	for (i = 0; t && i < t->nr_rx; i++) {
		p = t->rx[i];
		if (!only_busy || ivl_ring_pending(&p->rx) ||
		    READ_ONCE(p->tx_stopped))
			napi_schedule(&p->napi);
	}
	rcu_read_unlock();
}

/*
 * Detach: deliver what peers already sent.  NAPI is disabled.  A ring
 * holds at most size / IVL_REC_ALIGN records, so that many per pass
 * empties it unless its producer keeps writing.
 */
static void ivl_rx_drain(struct ivl_priv *priv, struct ivl_shm *shm)
{
	u32 cap = shm->ring_size / IVL_REC_ALIGN;
	struct ivl_peer *p;
	int n;
	u32 id, left;

	for (id = 0; id < shm->max_peers; id++) {
		p = &shm->peers[id];
		if (id == shm->my_slot || !p->attached || !p->rx_on)
			continue;
		for (left = cap; left > 0; left -= n) {
			local_bh_disable();
			n = ivl_rx_ring(priv, p, NULL,
					min_t(u32, left, NAPI_POLL_WEIGHT));
			local_bh_enable();
			if (!n)
				break;
			cond_resched();
		}
	}
}

/* Records still in the rings to us when we let go: counted, not read. */
static void ivl_rx_count_lost(struct ivl_priv *priv, struct ivl_shm *shm)
{
	u32 cap = shm->ring_size / IVL_REC_ALIGN;
	struct ivl_peer *p;
	struct ivl_rec rec;
	u32 id, n, lost = 0;

	for (id = 0; id < shm->max_peers; id++) {
		p = &shm->peers[id];
		if (id == shm->my_slot || !p->attached || !p->rx_on ||
		    test_bit(IVL_PEER_BROKEN, &p->flags))
			continue;
		for (n = 0; n < cap && !ivl_ring_peek(&p->rx, &rec); n++)
			ivl_ring_consume(&p->rx, &rec);
		lost += n;
	}
	if (!lost)
		return;
	ivl_stat_add_bh(priv, rx_leave_lost, lost);
	netdev_warn(priv->dev, "%u frames still in the rings when the device left\n",
		    lost);
}

/*
 * Leaving for good (the device goes away): every UP peer acknowledges in
 * its slot that it stopped sending to us (ivl_leave_ack_publish()), and
 * we drain until all have, or IVL_LEAVE_ACK_MS passed.  What was sent
 * before an ack is read by the last drain; with every ack in, nothing can
 * arrive after it.
 */
static void ivl_leave_handshake(struct ivl_priv *priv, struct ivl_shm *shm)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(IVL_LEAVE_ACK_MS);
	u32 missing;

	for (;;) {
		ivl_rx_drain(priv, shm);
		missing = ivl_peers_unacked(shm);
		if (!missing || time_after(jiffies, deadline))
			break;
		usleep_range(500, 1000);
	}
	ivl_rx_drain(priv, shm);
	if (missing) {
		ivl_stat_add_bh(priv, leave_ack_timeouts, missing);
		netdev_warn(priv->dev, "%u peers did not acknowledge our leaving within %u ms\n",
			    missing, IVL_LEAVE_ACK_MS);
	}
	ivl_rx_count_lost(priv, shm);
}

/* ------------------------------------------------------------------ */
/* receive from the lower NIC                                         */

static rx_handler_result_t ivl_handle_frame(struct sk_buff **pskb)
{
	struct sk_buff *skb = *pskb;
	struct ivl_priv *priv = rcu_dereference(skb->dev->rx_handler_data);

	if (unlikely(skb->pkt_type == PACKET_LOOPBACK) ||
	    !netif_running(priv->dev))
		return RX_HANDLER_PASS;

	skb = skb_share_check(skb, GFP_ATOMIC);
	if (unlikely(!skb)) {
		ivl_stat_inc(priv, rx_lower_drops);
		return RX_HANDLER_CONSUMED;
	}
	*pskb = skb;
	skb->dev = priv->dev;
	ivl_stat_inc(priv, lower_rx_packets);
	ivl_stat_add(priv, lower_rx_bytes, skb->len + ETH_HLEN);
	return RX_HANDLER_ANOTHER;
}

/* ------------------------------------------------------------------ */
/* pairing with the PCI device (rtnl)                                 */

static void ivl_napi_enable(struct ivl_priv *priv, struct ivl_shm *shm,
			    bool on)
{
	u32 id;

	if (priv->napi_on == on)
		return;
	for (id = 0; id < shm->max_peers; id++) {
		if (id == shm->my_slot)
			continue;
		if (on)
			napi_enable(&shm->peers[id].napi);
		else
			napi_disable(&shm->peers[id].napi);
	}
	priv->napi_on = on;
}

/*
 * Announce ivl0's MAC in our slot.  Not one the server did not see on our
 * NIC: it would evict us for the claim (and peers would not send to us).
 */
static void ivl_shm_publish_up(struct ivl_priv *priv, struct ivl_shm *shm)
{
	const u8 *mac = priv->dev->dev_addr;

	if (shm->nic_mac_known && !ether_addr_equal(mac, shm->nic_mac)) {
		netdev_warn(priv->dev, "MAC %pM is not the %pM the host knows for this NIC: shared memory off until it is\n",
			    mac, shm->nic_mac);
		ivl_slot_publish(shm, IVL_STATE_DOWN, NULL);
		return;
	}
	ivl_slot_publish(shm, IVL_STATE_UP, mac);
}

static void ivl_shm_up(struct ivl_priv *priv, struct ivl_shm *shm)
{
	ivl_napi_enable(priv, shm, true);
	ivl_shm_publish_up(priv, shm);
	ivl_notify_peers(shm);
	/* frames already waiting in rings: the refresh schedules their NAPI */
	queue_work(system_wq, &shm->refresh_work);
}

static void ivl_shm_down(struct ivl_priv *priv, struct ivl_shm *shm)
{
	/* peers stop sending; what they sent waits for the next ndo_open */
	ivl_slot_publish(shm, IVL_STATE_DOWN, NULL);
	ivl_notify_peers(shm);
	ivl_napi_enable(priv, shm, false);
}

/* Forget TX flow-control state: nothing may point into the rings. */
static void ivl_tx_flow_reset(struct ivl_priv *priv, struct ivl_shm *shm)
{
	struct netdev_queue *txq;
	struct ivl_peer *p;
	u32 id;

	for (id = 0; id < shm->max_peers; id++) {
		p = &shm->peers[id];
		if (id == shm->my_slot)
			continue;
		hrtimer_cancel(&p->tx_timer);
		txq = ivl_peer_txq(priv, p);
		__netif_tx_lock_bh(txq);
		p->kick_pending = false;
		if (p->tx_stopped) {
			WRITE_ONCE(p->tx_stopped, false);
			/* when closed, ndo_open starts the queues again */
			if (netif_running(priv->dev))
				netif_tx_wake_queue(txq);
		}
		__netif_tx_unlock_bh(txq);
	}
}

static const struct page_pool_params ivl_rx_pool_params = {
	.order		= IVL_RX_ORDER,
	/*
	 * The recycle ring: freed pages beyond it go back to the system.
	 * With the pool's refill batch, at most about 192 pages (6 MiB) wait
	 * for reuse when traffic stops.
	 */
	.pool_size	= 128,
	.nid		= NUMA_NO_NODE,
};

/* A NAPI instance and a page pool for every other slot.  rtnl. */
static void ivl_rx_init(struct ivl_priv *priv, struct ivl_shm *shm)
{
	struct ivl_peer *p;
	u32 id;

	for (id = 0; id < shm->max_peers; id++) {
		p = &shm->peers[id];
		if (id == shm->my_slot)
			continue;
		netif_napi_add(priv->dev, &p->napi, ivl_napi_poll);
		p->rx_pool = page_pool_create(&ivl_rx_pool_params);
		/* without one, frames take pages from the page allocator */
		if (IS_ERR(p->rx_pool))
			p->rx_pool = NULL;
	}
}

static void ivl_rx_uninit(struct ivl_shm *shm)
{
	struct ivl_peer *p;
	u32 id;

	/* one grace period for all, not one per slot (netif_napi_del()) */
	for (id = 0; id < shm->max_peers; id++)
		if (id != shm->my_slot)
			__netif_napi_del(&shm->peers[id].napi);
	synchronize_net();
	for (id = 0; id < shm->max_peers; id++) {
		p = &shm->peers[id];
		if (id == shm->my_slot)
			continue;
		/* pages still in skbs come back later; the pool waits for them */
		if (p->rx_pool)
			page_pool_destroy(p->rx_pool);
		p->rx_pool = NULL;
	}
}

/*
 * rtnl.  Does @shm belong under @priv?  The server tells which of the
 * guest's NICs is the data NIC; when it could not, any free upper will do.
 */
static bool ivl_pair_match(const struct ivl_priv *priv,
			   const struct ivl_shm *shm)
{
	if (shm->upper || ivl_shm_rtnl(priv))
		return false;
	return !shm->nic_mac_known ||
	       ether_addr_equal(priv->lower->dev_addr, shm->nic_mac);
}

void ivl_pair_shm(struct ivl_shm *shm)
{
	struct ivl_priv *priv;

	ASSERT_RTNL();
	list_for_each_entry(priv, &ivl_uppers, node) {
		if (ivl_pair_match(priv, shm)) {
			ivl_attach(priv, shm);
			return;
		}
	}
	dev_info(&shm->pdev->dev, "waiting for an ivloop link on the data NIC\n");
}

static void ivl_pair_upper(struct ivl_priv *priv)
{
	struct ivl_shm *shm;

	ASSERT_RTNL();
	list_for_each_entry(shm, &ivl_shms, node) {
		if (ivl_pair_match(priv, shm)) {
			ivl_attach(priv, shm);
			return;
		}
	}
}

static void ivl_vlan_resync(struct ivl_priv *priv);

void ivl_attach(struct ivl_priv *priv, struct ivl_shm *shm)
{
	ASSERT_RTNL();
	/* after a migration the device joins before virtio-net announces us */
	ivl_vlan_resync(priv);
	shm->upper = priv;
	ivl_rx_init(priv, shm);
	rcu_assign_pointer(priv->shm, shm);
	ivl_peers_start(shm, priv);
	if (netif_running(priv->dev))
		ivl_shm_up(priv, shm);
	netdev_info(priv->dev, "shared memory %s attached: slot %u of %u, peer id %u, rings of %u KiB\n",
		    pci_name(shm->pdev), shm->my_slot, shm->max_peers,
		    shm->my_peer_id,
		    shm->ring_size / 1024);
}

/*
 * @state: IVL_STATE_LEAVING when the device goes away, IVL_STATE_DOWN
 * when ivl0 does.  Afterwards no frame, timer, work or IRQ of ours uses
 * the rings or @priv through the device.
 */
void ivl_detach(struct ivl_priv *priv, u32 state)
{
	struct ivl_shm *shm = ivl_shm_rtnl(priv);
	bool drain = priv->napi_on;

	ASSERT_RTNL();
	/* peers first stop sending to us ... */
	ivl_slot_publish(shm, state, NULL);
	ivl_notify_peers(shm);
	/* ... then we stop sending to them: no table, no shm, grace period */
	ivl_peers_stop(shm);
	RCU_INIT_POINTER(priv->shm, NULL);
	synchronize_rcu();

	ivl_napi_enable(priv, shm, false);
	if (drain && state == IVL_STATE_LEAVING)
		ivl_leave_handshake(priv, shm);
	else if (drain)
		ivl_rx_drain(priv, shm);
	ivl_tx_flow_reset(priv, shm);

	/* the IRQ handlers read shm->priv without locks: wait them out */
	mutex_lock(&shm->lock);
	WRITE_ONCE(shm->priv, NULL);
	mutex_unlock(&shm->lock);
	synchronize_irq(pci_irq_vector(shm->pdev, IVL_VEC_MEMBERSHIP));
	synchronize_irq(pci_irq_vector(shm->pdev, IVL_VEC_DATA));
	ivl_rx_uninit(shm);
	shm->upper = NULL;

	netdev_info(priv->dev, "shared memory %s detached (%s)\n",
		    pci_name(shm->pdev),
		    state == IVL_STATE_LEAVING ? "device removed" : "device down");
}

/* ------------------------------------------------------------------ */
/* net_device_ops                                                     */

static int ivl_ndo_init(struct net_device *dev)
{
	struct ivl_priv *priv = netdev_priv(dev);
	int err;

	priv->stats = netdev_alloc_pcpu_stats(struct ivl_pcpu_stats);
	if (!priv->stats)
		return -ENOMEM;
	/* our TX lock is held while the lower device takes its own */
	netdev_lockdep_set_classes(dev);
	netdev_hold(priv->lower, &priv->lower_tracker, GFP_KERNEL);
	err = ivl_poll_init(priv);
	if (err)
		goto put_lower;
	return 0;

put_lower:
	netdev_put(priv->lower, &priv->lower_tracker);
	free_percpu(priv->stats);
	priv->stats = NULL;
	return err;
}

/* Every way out (dellink, lower gone, failed newlink) comes through here. */
static void ivl_ndo_uninit(struct net_device *dev)
{
	struct ivl_priv *priv = netdev_priv(dev);

	if (ivl_shm_rtnl(priv))
		ivl_detach(priv, IVL_STATE_DOWN);
	if (priv->rx_handler_on) {
		/* waits for a grace period: no rx_handler still uses @priv */
		netdev_rx_handler_unregister(priv->lower);
		priv->rx_handler_on = false;
	}
	if (priv->upper_linked) {
		netdev_upper_dev_unlink(priv->lower, dev);
		priv->upper_linked = false;
	}
	ivl_poll_uninit(priv);
	list_del_init(&priv->node);
	netdev_put(priv->lower, &priv->lower_tracker);
}

static void ivl_priv_destructor(struct net_device *dev)
{
	struct ivl_priv *priv = netdev_priv(dev);

	free_percpu(priv->stats);
}

static int ivl_open(struct net_device *dev)
{
	struct ivl_priv *priv = netdev_priv(dev);
	struct ivl_shm *shm = ivl_shm_rtnl(priv);
	struct net_device *lower = priv->lower;
	int err;

	if (dev->flags & IFF_ALLMULTI) {
		err = dev_set_allmulti(lower, 1);
		if (err)
			return err;
	}
	if (dev->flags & IFF_PROMISC) {
		err = dev_set_promiscuity(lower, 1);
		if (err)
			goto clear_allmulti;
	}
	if (shm)
		ivl_shm_up(priv, shm);
	netif_stacked_transfer_operstate(lower, dev);
	netif_tx_start_all_queues(dev);
	return 0;

clear_allmulti:
	if (dev->flags & IFF_ALLMULTI)
		dev_set_allmulti(lower, -1);
	return err;
}

static int ivl_stop(struct net_device *dev)
{
	struct ivl_priv *priv = netdev_priv(dev);
	struct ivl_shm *shm = ivl_shm_rtnl(priv);
	struct net_device *lower = priv->lower;

	if (shm) {
		ivl_shm_down(priv, shm);
		ivl_tx_flow_reset(priv, shm);
	}
	dev_uc_unsync(lower, dev);
	dev_mc_unsync(lower, dev);
	if (dev->flags & IFF_ALLMULTI)
		dev_set_allmulti(lower, -1);
	if (dev->flags & IFF_PROMISC)
		dev_set_promiscuity(lower, -1);
	return 0;
}

static int ivl_change_mtu(struct net_device *dev, int new_mtu)
{
	struct ivl_priv *priv = netdev_priv(dev);

	if (new_mtu > priv->lower->mtu)
		return -EINVAL;
	dev->mtu = new_mtu;
	return 0;
}

/* Addresses ivl0 listens on must pass the lower NIC's filter. */
static void ivl_set_rx_mode(struct net_device *dev)
{
	struct ivl_priv *priv = netdev_priv(dev);

	dev_mc_sync(priv->lower, dev);
	dev_uc_sync(priv->lower, dev);
}

static void ivl_change_rx_flags(struct net_device *dev, int change)
{
	struct ivl_priv *priv = netdev_priv(dev);

	if (!(dev->flags & IFF_UP))
		return;
	if (change & IFF_ALLMULTI)
		dev_set_allmulti(priv->lower,
				 dev->flags & IFF_ALLMULTI ? 1 : -1);
	if (change & IFF_PROMISC)
		dev_set_promiscuity(priv->lower,
				    dev->flags & IFF_PROMISC ? 1 : -1);
}

/*
 * ivl0 carries its NIC's MAC: the host knows the NIC by it, and peers
 * reach us at the MAC the host vouches for.  So a new address (bonding's
 * balance modes set every port's) goes to the lower NIC, and ivl0 follows
 * it (NETDEV_CHANGEADDR).  Shared memory stays off while the MAC is not
 * the one the server saw (ivl_shm_publish_up()): traffic takes the lower
 * NIC, nothing is lost.
 */
static int ivl_set_mac_address(struct net_device *dev, void *p)
{
	struct ivl_priv *priv = netdev_priv(dev);
	struct sockaddr *sa = p;

	if (!is_valid_ether_addr(sa->sa_data))
		return -EADDRNOTAVAIL;
	return dev_set_mac_address(priv->lower, sa, NULL);
}

static int ivl_vlan_rx_add_vid(struct net_device *dev, __be16 proto, u16 vid)
{
	struct ivl_priv *priv = netdev_priv(dev);
	int err;

	err = vlan_vid_add(priv->lower, proto, vid);
	if (!err && proto == htons(ETH_P_8021Q))
		set_bit(vid, priv->vids);
	return err;
}

static int ivl_vlan_rx_kill_vid(struct net_device *dev, __be16 proto, u16 vid)
{
	struct ivl_priv *priv = netdev_priv(dev);

	if (proto == htons(ETH_P_8021Q))
		clear_bit(vid, priv->vids);
	vlan_vid_del(priv->lower, proto, vid);
	return 0;
}

/*
 * rtnl.  QEMU before 8.1 empties virtio-net's VLAN filter when a migrated
 * guest resumes (its set_features runs after the load), and tagged frames
 * from the wire stop arriving.  virtio-net announces the guest after a
 * migration: give its filter our VLAN IDs again (adding one twice is
 * harmless, and the refcounted vlan_vid_add() would not call it again).
 */
static void ivl_vlan_resync(struct ivl_priv *priv)
{
	struct net_device *lower = priv->lower;
	const struct net_device_ops *ops = lower->netdev_ops;
	unsigned int vid;

	if (!(lower->features & NETIF_F_HW_VLAN_CTAG_FILTER) ||
	    !ops->ndo_vlan_rx_add_vid)
		return;
	for_each_set_bit(vid, priv->vids, VLAN_N_VID)
		ops->ndo_vlan_rx_add_vid(lower, htons(ETH_P_8021Q), vid);
}

static int ivl_get_iflink(const struct net_device *dev)
{
	const struct ivl_priv *priv = netdev_priv(dev);

	return priv->lower->ifindex;
}

static const struct net_device_ops ivl_netdev_ops = {
	.ndo_init		= ivl_ndo_init,
	.ndo_uninit		= ivl_ndo_uninit,
	.ndo_open		= ivl_open,
	.ndo_stop		= ivl_stop,
	.ndo_start_xmit		= ivl_start_xmit,
	.ndo_select_queue	= ivl_select_queue,
	.ndo_get_stats64	= ivl_get_stats64,
	.ndo_change_mtu		= ivl_change_mtu,
	.ndo_set_rx_mode	= ivl_set_rx_mode,
	.ndo_change_rx_flags	= ivl_change_rx_flags,
	.ndo_get_iflink		= ivl_get_iflink,
	.ndo_validate_addr	= eth_validate_addr,
	.ndo_set_mac_address	= ivl_set_mac_address,
	.ndo_vlan_rx_add_vid	= ivl_vlan_rx_add_vid,
	.ndo_vlan_rx_kill_vid	= ivl_vlan_rx_kill_vid,
};

/* ------------------------------------------------------------------ */
/* ethtool                                                            */

static void ivl_get_drvinfo(struct net_device *dev,
			    struct ethtool_drvinfo *info)
{
	struct ivl_priv *priv = netdev_priv(dev);
	struct ivl_shm *shm = ivl_shm_rtnl(priv);

	strscpy(info->driver, IVL_DRV_NAME, sizeof(info->driver));
	strscpy(info->bus_info, shm ? pci_name(shm->pdev) : "",
		sizeof(info->bus_info));
	info->n_priv_flags = ARRAY_SIZE(ivl_priv_flag_names);
}

static int ivl_get_sset_count(struct net_device *dev, int sset)
{
	switch (sset) {
	case ETH_SS_STATS:
		return IVL_NR_STATS;
	case ETH_SS_PRIV_FLAGS:
		return ARRAY_SIZE(ivl_priv_flag_names);
	default:
		return -EOPNOTSUPP;
	}
}

static void ivl_get_strings(struct net_device *dev, u32 sset, u8 *buf)
{
	unsigned int i;

	switch (sset) {
	case ETH_SS_STATS:
		for (i = 0; i < IVL_NR_STATS; i++)
			memcpy(buf + i * ETH_GSTRING_LEN,
			       ivl_stat_descs[i].name, ETH_GSTRING_LEN);
		break;
	case ETH_SS_PRIV_FLAGS:
		memcpy(buf, ivl_priv_flag_names, sizeof(ivl_priv_flag_names));
		break;
	}
}

static void ivl_get_ethtool_stats(struct net_device *dev,
				  struct ethtool_stats *stats, u64 *data)
{
	ivl_stats_sum(netdev_priv(dev), data);
}

static u32 ivl_get_priv_flags(struct net_device *dev)
{
	struct ivl_priv *priv = netdev_priv(dev);

	return test_bit(IVL_F_FORCE_LOWER, &priv->flags) ?
	       BIT(IVL_F_FORCE_LOWER) : 0;
}

static int ivl_set_priv_flags(struct net_device *dev, u32 flags)
{
	struct ivl_priv *priv = netdev_priv(dev);
	struct ivl_shm *shm;

	if (flags & ~BIT(IVL_F_FORCE_LOWER))
		return -EINVAL;
	/* xmit reads the bit per frame; frames in rings still arrive */
	assign_bit(IVL_F_FORCE_LOWER, &priv->flags,
		   flags & BIT(IVL_F_FORCE_LOWER));
	/* a queue stopped on a full ring need not wait for it any more */
	shm = ivl_shm_rtnl(priv);
	if (shm)
		ivl_tx_wake_check(priv, shm);
	return 0;
}

/*
 * rx-usecs: the longest ring-poll window (ivl_poll.c).  0 turns polling
 * off: frames then always wait for a doorbell.
 */
static int ivl_get_coalesce(struct net_device *dev,
			    struct ethtool_coalesce *ec,
			    struct kernel_ethtool_coalesce *kec,
			    struct netlink_ext_ack *extack)
{
	struct ivl_priv *priv = netdev_priv(dev);

	ec->rx_coalesce_usecs = READ_ONCE(priv->poll_max_us);
	return 0;
}

static_assert(IVL_POLL_US_MAX == 10000);

static int ivl_set_coalesce(struct net_device *dev,
			    struct ethtool_coalesce *ec,
			    struct kernel_ethtool_coalesce *kec,
			    struct netlink_ext_ack *extack)
{
	struct ivl_priv *priv = netdev_priv(dev);

	if (ec->rx_coalesce_usecs > IVL_POLL_US_MAX) {
		NL_SET_ERR_MSG_MOD(extack, "rx-usecs is at most 10000");
		return -EINVAL;
	}
	/* read on every use; an open window ends at the new length */
	WRITE_ONCE(priv->poll_max_us, ec->rx_coalesce_usecs);
	return 0;
}

static int ivl_get_link_ksettings(struct net_device *dev,
				  struct ethtool_link_ksettings *cmd)
{
	struct ivl_priv *priv = netdev_priv(dev);

	return __ethtool_get_link_ksettings(priv->lower, cmd);
}

static const struct ethtool_ops ivl_ethtool_ops = {
	.supported_coalesce_params = ETHTOOL_COALESCE_RX_USECS,
	.get_drvinfo		= ivl_get_drvinfo,
	.get_coalesce		= ivl_get_coalesce,
	.set_coalesce		= ivl_set_coalesce,
	.get_link		= ethtool_op_get_link,
	.get_link_ksettings	= ivl_get_link_ksettings,
	.get_sset_count		= ivl_get_sset_count,
	.get_strings		= ivl_get_strings,
	.get_ethtool_stats	= ivl_get_ethtool_stats,
	.get_priv_flags		= ivl_get_priv_flags,
	.set_priv_flags		= ivl_set_priv_flags,
};

/* ------------------------------------------------------------------ */
/* rtnl_link_ops                                                      */

static void ivl_setup(struct net_device *dev)
{
	struct ivl_priv *priv = netdev_priv(dev);

	ether_setup(dev);
	priv->dev = dev;
	INIT_LIST_HEAD(&priv->node);
	priv->flags = ivl_param_force_lower ? BIT(IVL_F_FORCE_LOWER) : 0;
	/*
	 * The ring poller pays where measured: 1-vCPU guests (TCP_RR 4.85x
	 * faster than the lower path).  On 2-vCPU guests of a 2-core TCG
	 * host its thread's wake-ups cost more than the doorbells it saves
	 * (TCP_RR 1.2-1.6 ms polled, 0.6 ms with doorbells), so SMP guests
	 * start with doorbells only; rx-usecs turns it on.
	 */
	priv->poll_max_us = num_online_cpus() > 1 ? 0 : ivl_param_poll_us;
	dev->netdev_ops = &ivl_netdev_ops;
	dev->ethtool_ops = &ivl_ethtool_ops;
	dev->needs_free_netdev = true;
	dev->priv_destructor = ivl_priv_destructor;
	dev->priv_flags &= ~IFF_TX_SKB_SHARING;
	/* extra unicast addresses go to the lower NIC's filter, not promisc */
	dev->priv_flags |= IFF_UNICAST_FLT;
	/* real qdiscs: a peer's queue is stopped while its ring is full */
	dev->hw_features = IVL_FEATURES;
	dev->features = IVL_FEATURES | IVL_VLAN_FEATURES;
	ivl_dev_set_netns_local(dev);
	dev->vlan_features = IVL_FEATURES;
	dev->min_mtu = ETH_MIN_MTU;
	/*
	 * What the core checks a new link's MTU against, before newlink
	 * knows the lower device; newlink then holds it to the lower's.
	 */
	dev->max_mtu = ETH_MAX_MTU;
	/* one record carries a whole 64 KiB GSO frame */
	netif_set_tso_max_size(dev, IVL_GSO_MAX_SIZE);
}

static int ivl_validate(struct nlattr *tb[], struct nlattr *data[],
			struct netlink_ext_ack *extack)
{
	if (tb[IFLA_ADDRESS]) {
		NL_SET_ERR_MSG(extack, "ivloop uses the lower device's MAC address");
		return -EINVAL;
	}
	return 0;
}

static int ivl_lower_check(struct net_device *lower,
			   struct netlink_ext_ack *extack)
{
	if (lower->type != ARPHRD_ETHER || lower->flags & IFF_LOOPBACK ||
	    lower->addr_len != ETH_ALEN) {
		NL_SET_ERR_MSG(extack, "ivloop needs an Ethernet lower device");
		return -EINVAL;
	}
	if (lower->rtnl_link_ops == &ivl_link_ops) {
		NL_SET_ERR_MSG(extack, "ivloop cannot stack on ivloop");
		return -ELOOP;
	}
	if (netdev_is_rx_handler_busy(lower)) {
		NL_SET_ERR_MSG(extack, "the lower device is already taken (bridge, bond, ivloop?)");
		return -EBUSY;
	}
	return 0;
}

static int ivl_newlink(struct net *src_net, struct net_device *dev,
		       struct nlattr *tb[], struct nlattr *data[],
		       struct netlink_ext_ack *extack)
{
	struct ivl_priv *priv = netdev_priv(dev);
	struct net_device *lower;
	int err;

	if (!tb[IFLA_LINK]) {
		NL_SET_ERR_MSG(extack, "ivloop needs a lower device (link DEV)");
		return -EINVAL;
	}
	static_assert(IVL_MAX_TXQ == 65);
	if (dev->num_tx_queues < IVL_TXQ_PEER0 + 1 ||
	    dev->num_tx_queues > IVL_MAX_TXQ) {
		NL_SET_ERR_MSG(extack, "ivloop needs numtxqueues between 2 and 65");
		return -EINVAL;
	}
	lower = __dev_get_by_index(src_net, nla_get_u32(tb[IFLA_LINK]));
	if (!lower)
		return -ENODEV;
	err = ivl_lower_check(lower, extack);
	if (err)
		return err;

	priv->lower = lower;
	if (!tb[IFLA_MTU]) {
		dev->mtu = lower->mtu;
	} else if (dev->mtu > lower->mtu) {
		/* frames that fit ivl0 but not the lower NIC would be lost */
		NL_SET_ERR_MSG(extack, "MTU above the lower device's: raise that first");
		return -EINVAL;
	}
	dev->max_mtu = lower->max_mtu;
	eth_hw_addr_set(dev, lower->dev_addr);
	dev->needed_headroom = lower->needed_headroom;
	dev->needed_tailroom = lower->needed_tailroom;

	err = register_netdevice(dev);
	if (err)
		return err;

	err = netdev_upper_dev_link(lower, dev, extack);
	if (err)
		goto unregister_netdev;
	priv->upper_linked = true;

	err = netdev_rx_handler_register(lower, ivl_handle_frame, priv);
	if (err) {
		NL_SET_ERR_MSG(extack, "the lower device already has an rx_handler");
		goto unregister_netdev;
	}
	priv->rx_handler_on = true;

	netif_stacked_transfer_operstate(lower, dev);
	list_add_tail(&priv->node, &ivl_uppers);
	ivl_pair_upper(priv);
	return 0;

unregister_netdev:
	/* ivl_ndo_uninit() undoes the link and the rx_handler */
	unregister_netdevice(dev);
	return err;
}

static void ivl_dellink(struct net_device *dev, struct list_head *head)
{
	unregister_netdevice_queue(dev, head);
}

static struct net *ivl_get_link_net(const struct net_device *dev)
{
	const struct ivl_priv *priv = netdev_priv(dev);

	return dev_net(priv->lower);
}

static unsigned int ivl_get_num_tx_queues(void)
{
	return IVL_DEF_TXQ;
}

struct rtnl_link_ops ivl_link_ops __read_mostly = {
	.kind		= IVL_LINK_KIND,
	.get_num_tx_queues = ivl_get_num_tx_queues,
	.priv_size	= sizeof(struct ivl_priv),
	.setup		= ivl_setup,
	.validate	= ivl_validate,
	.newlink	= ivl_newlink,
	.dellink	= ivl_dellink,
	.get_link_net	= ivl_get_link_net,
};

/* ------------------------------------------------------------------ */
/* following the lower device                                         */

static void ivl_follow_addr(struct ivl_priv *priv)
{
	struct net_device *dev = priv->dev;
	struct ivl_shm *shm = ivl_shm_rtnl(priv);

	if (ether_addr_equal(dev->dev_addr, priv->lower->dev_addr))
		return;
	eth_hw_addr_set(dev, priv->lower->dev_addr);
	call_netdevice_notifiers(NETDEV_CHANGEADDR, dev);
	if (shm && netif_running(dev)) {
		/* the slot's seq keeps peers from reading half of it */
		ivl_shm_publish_up(priv, shm);
		ivl_notify_peers(shm);
	}
}

static int ivl_netdev_event(struct notifier_block *nb, unsigned long event,
			    void *ptr)
{
	struct net_device *dev = netdev_notifier_info_to_dev(ptr);
	struct ivl_priv *priv;
	LIST_HEAD(list_kill);

	/* our rx_handler marks the lower devices we stack on */
	if (rcu_access_pointer(dev->rx_handler) != ivl_handle_frame)
		return NOTIFY_DONE;
	priv = rtnl_dereference(dev->rx_handler_data);

	switch (event) {
	case NETDEV_UP:
	case NETDEV_DOWN:
	case NETDEV_CHANGE:
		netif_stacked_transfer_operstate(dev, priv->dev);
		break;
	case NETDEV_CHANGEMTU:
		priv->dev->max_mtu = dev->max_mtu;
		if (priv->dev->mtu != dev->mtu)
			dev_set_mtu(priv->dev, dev->mtu);
		break;
	case NETDEV_CHANGEADDR:
		ivl_follow_addr(priv);
		break;
	case NETDEV_NOTIFY_PEERS:
		ivl_vlan_resync(priv);
		fallthrough;
	case NETDEV_RESEND_IGMP:
		/* The lower NIC was asked to announce itself (virtio-net does
		 * after a migration), but the addresses live on ivl0: it is
		 * ivl0 that must send the gratuitous ARP/NA and IGMP reports.
		 */
		call_netdevice_notifiers(event, priv->dev);
		break;
	case NETDEV_UNREGISTER:
		/* a netns move of the lower device is not its end */
		if (dev->reg_state != NETREG_UNREGISTERING)
			break;
		ivl_dellink(priv->dev, &list_kill);
		unregister_netdevice_many(&list_kill);
		break;
	}
	return NOTIFY_DONE;
}

struct notifier_block ivl_netdev_notifier = {
	.notifier_call = ivl_netdev_event,
};
