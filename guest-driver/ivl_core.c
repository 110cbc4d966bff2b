// SPDX-License-Identifier: GPL-2.0
/*
 * ivloop data path: frames into and out of the rings, and the lower NIC.
 *
 * Transmit, per frame (net_failover's shape): a unicast frame to a usable
 * peer, from the MAC we published, with offloads a record can carry, goes
 * into that peer's ring; everything else goes to the lower NIC with
 * dev_queue_xmit().  ndo_select_queue picks the peer's queue (1 + slot,
 * modulo the queues there are) or queue 0 for the lower NIC.
 *
 * Locking: a peer queue's TX lock (taken by the core around
 * ndo_start_xmit) is the one producer lock of that peer's ring.  The TX
 * flow-control timer, NAPI's wake check and ring re-attachment take the
 * same lock.  The peer table is read under RCU (rcu_read_lock_bh in xmit,
 * rcu_read_lock in NAPI).
 *
 * Flow control: a peer's queue is stopped as soon as the ring just written
 * lacks room for one more maximal frame, so a frame that is handed to us
 * always fits and NETDEV_TX_BUSY is never needed.  Ring consumers only ask
 * for doorbells when they go idle, so the producer has no doorbell of its
 * own for "room again".  Two things wake the queue, whichever comes first:
 *  - the consumer: when it reads a ring that was nearly full (fill above
 *    size - 2 maximal records, the most a stopped producer can be waiting
 *    for) it rings our data vector after freeing space; our NAPI then runs
 *    the wake check.  This is the fast path and needs no ABI field.
 *  - a soft hrtimer polling the ring, 20 us doubling to 1 ms.  It is what
 *    makes progress certain even when a doorbell is lost or the peer does
 *    not send one, and after stall_ms it gives up on the peer: the peer is
 *    marked stalled and its frames take the lower path until its ring has
 *    room again.
 * Behind a root qdisc shared by all queues (htb, tbf, noqueue) the queue is
 * never stopped: frames that find the ring full go lower instead.
 *
 * Receive: frames from the lower NIC arrive through an rx_handler; frames
 * from rings through one NAPI instance per peer, scheduled by the data
 * vector or the ring poller (ivl_poll.c).
 */
#include <linux/highmem.h>
#include <linux/ip.h>
#include <linux/skbuff.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <net/tcp.h>

#include "ivl.h"
#include "ivl_meta.h"

/* GSO types a record can carry; others go to the lower NIC. */
#define IVL_SKB_GSO_OK	(SKB_GSO_TCPV4 | SKB_GSO_TCPV6 | SKB_GSO_TCP_ECN | \
			 SKB_GSO_UDP_L4 | SKB_GSO_DODGY)

/* Two maximal records: the most room a stopped producer waits for. */
#define IVL_SPACE_KICK_MARGIN \
	(2 * ALIGN(sizeof(struct ivl_rec_hdr) + IVL_MAX_FRAME, IVL_REC_ALIGN))

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
	/* the stack keeps the headers linear: check them there, no copy */
	hlen = min_t(u32, skb_headlen(skb), IVL_META_HDR_MAX);
	if (!ivl_meta_check(skb->data, hlen, skb->len, m))
		return true;
	if (hlen == min_t(u32, skb->len, IVL_META_HDR_MAX))
		return false;
	/* headers reaching into the frags: what the receiver will see */
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

/**
 * ivl_select_queue() - ndo_select_queue: the queue @skb waits in
 * @dev: ivl0
 * @skb: the frame
 * @sb_dev: unused (no subordinate devices)
 *
 * Its peer's queue while that peer can take frames, else the lower NIC's
 * (IVL_TXQ_LOWER).  A stalled or broken peer's frames thus never wait
 * behind its ring; frames from a MAC that is not ours never reach a ring.
 *
 * Context: dev_queue_xmit() calls this under rcu_read_lock_bh, but
 * af_packet's PACKET_QDISC_BYPASS from process context: it takes its own
 * (it nests), which also keeps the per-CPU counters' BH rule.
 * Return: the queue index.
 */
u16 ivl_select_queue(struct net_device *dev, struct sk_buff *skb,
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
	ivl_assert_txq_held(priv, peer);
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

	ivl_assert_txq_held(priv, peer);
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

/**
 * ivl_tx_wake_check() - start every peer queue whose reason to stop is gone
 * @priv: ivl0
 * @shm: its device
 *
 * Context: any but hard IRQ; takes each stopped queue's TX lock.
 */
void ivl_tx_wake_check(struct ivl_priv *priv, struct ivl_shm *shm)
{
	struct ivl_peer *p;

	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p))
		if (READ_ONCE(p->tx_stopped))
			ivl_tx_wake_peer(priv, p);
}

static ktime_t ivl_us(u32 us)
{
	return ns_to_ktime((u64)us * NSEC_PER_USEC);
}

/**
 * ivl_tx_timer_fn() - a peer's flow-control timer: poll its full ring
 * @timer: &ivl_peer.tx_timer
 *
 * Context: soft hrtimer (softirq); takes the peer's queue lock.
 * Return: HRTIMER_RESTART, backing off, while the queue stays stopped.
 */
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
	lockdep_assert_held(&txq->_xmit_lock);
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

	lockdep_assert_held(&txq->_xmit_lock);
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

	lockdep_assert_held(&netdev_get_tx_queue(priv->dev, qid)->_xmit_lock);
	for (id = qid - IVL_TXQ_PEER0; id < shm->max_peers; id += nq)
		ivl_tx_kick_flush(priv, shm, &shm->peers[id]);
}

/**
 * ivl_start_xmit() - ndo_start_xmit: into a peer's ring, or lower
 * @skb: the frame
 * @dev: ivl0
 *
 * Queue 0 goes lower.  A peer queue's lock is the one producer lock of
 * its peer's ring: the frame goes into the ring only if the table still
 * routes it to a peer of this queue (it may have changed since
 * select_queue) and the record can carry it; otherwise it goes lower.
 *
 * Context: the queue's TX lock, BH disabled, rcu_read_lock_bh.
 * Return: NETDEV_TX_OK, always (a frame is sent, sent lower, or counted
 * as dropped by the lower NIC).
 */
netdev_tx_t ivl_start_xmit(struct sk_buff *skb, struct net_device *dev)
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

/**
 * ivl_napi_schedule_rx() - schedule the NAPI of every peer in the table
 * @priv: ivl0
 * @shm: its device
 * @only_busy: only those with records waiting or a stopped queue (the
 *             data vector does not say which peer rang)
 *
 * Context: any; the softirq runs when the caller re-enables BH.
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

/**
 * ivl_rx_drain() - deliver what peers already sent
 * @priv: ivl0
 * @shm: its device, its NAPIs disabled
 *
 * A ring holds at most size / IVL_REC_ALIGN records, so that many per pass
 * empties it unless its producer keeps writing.
 *
 * Context: process (BH disabled per batch).
 */
void ivl_rx_drain(struct ivl_priv *priv, struct ivl_shm *shm)
{
	u32 cap = shm->ring_size / IVL_REC_ALIGN;
	struct ivl_peer *p;
	u32 left;
	int n;

	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		if (!p->attached || !p->rx_on)
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

/* ------------------------------------------------------------------ */
/* receive from the lower NIC                                         */

/**
 * ivl_handle_frame() - rx_handler on the lower NIC: its frames are ivl0's
 * @pskb: the frame; may be replaced by an unshared copy
 *
 * Context: softirq, rcu_read_lock.
 * Return: RX_HANDLER_ANOTHER with the frame on ivl0, RX_HANDLER_PASS while
 * ivl0 is down (the NIC keeps it), RX_HANDLER_CONSUMED if it was dropped.
 */
rx_handler_result_t ivl_handle_frame(struct sk_buff **pskb)
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
/* receive and flow-control state, per attach (rtnl)                  */

/**
 * ivl_tx_flow_reset() - forget TX flow-control state
 * @priv: ivl0
 * @shm: its device
 *
 * Cancels every peer's timer and starts its stopped queue: nothing may
 * point into the rings afterwards.
 *
 * Context: process; takes each queue's TX lock.
 */
void ivl_tx_flow_reset(struct ivl_priv *priv, struct ivl_shm *shm)
{
	struct netdev_queue *txq;
	struct ivl_peer *p;

	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
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

/*
 * A NAPI instance and a page pool for @p, which came up.  Without a pool
 * its frames take pages from the page allocator.
 */
static void ivl_rx_create(struct ivl_priv *priv, struct ivl_peer *p)
{
	netif_napi_add(priv->dev, &p->napi, ivl_napi_poll);
	p->rx_pool = page_pool_create(&ivl_rx_pool_params);
	if (IS_ERR(p->rx_pool))
		p->rx_pool = NULL;
	if (priv->napi_on)
		napi_enable(&p->napi);
	p->rx_ready = true;
	ivl_stat_inc_bh(priv, peer_rx_made);
}

/*
 * Take @p's NAPI off ivl0; its pool goes after the caller's grace period
 * (one for all, not one per peer as netif_napi_del() would wait).  A late
 * napi_schedule() finds the instance disabled and does nothing.
 */
static void ivl_rx_unlist(struct ivl_priv *priv, struct ivl_peer *p)
{
	if (priv->napi_on)
		napi_disable(&p->napi);
	__netif_napi_del(&p->napi);
	p->rx_ready = false;
	ivl_stat_inc_bh(priv, peer_rx_freed);
}

static void ivl_rx_free_pools(struct ivl_shm *shm)
{
	struct ivl_peer *p;

	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		/* pages still in skbs come back later; the pool waits for them */
		if (!p->rx_ready && p->rx_pool) {
			page_pool_destroy(p->rx_pool);
			p->rx_pool = NULL;
		}
	}
}

/**
 * ivl_rx_sync() - receive state for the peers that are up, none for others
 * @priv: ivl0
 * @shm: its device
 *
 * A peer gets its NAPI instance and page pool when the refresh finds it up
 * (it stays out of the table until then) and loses them once it is out of
 * the table, so a guest pays for the peers it has, not for the region's
 * slots (63 of each at 64 peers, and a kthread each with threaded NAPI).
 *
 * Context: rtnl and shm->lock (NAPI on or off, ivl_napi_enable(), under
 * rtnl); sleeps.
 * Return: true if a peer got its state (the table can take it now).
 */
bool ivl_rx_sync(struct ivl_priv *priv, struct ivl_shm *shm)
{
	bool made = false, unlisted = false;
	struct ivl_peer *p;

	ASSERT_RTNL();
	lockdep_assert_held(&shm->lock);
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		if (p->up && !p->rx_ready) {
			ivl_rx_create(priv, p);
			made = true;
		} else if (!p->up && p->rx_ready && !p->rx_on) {
			ivl_rx_unlist(priv, p);
			unlisted = true;
		}
	}
	if (unlisted) {
		synchronize_net();
		ivl_rx_free_pools(shm);
	}
	return made;
}

/**
 * ivl_rx_uninit() - release every peer's receive state
 * @priv: ivl0
 * @shm: the device being detached, no table published, NAPIs disabled
 *
 * Context: rtnl; one synchronize_net() for all the NAPI instances.
 */
void ivl_rx_uninit(struct ivl_priv *priv, struct ivl_shm *shm)
{
	struct ivl_peer *p;

	ASSERT_RTNL();
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p))
		if (p->rx_ready)
			ivl_rx_unlist(priv, p);
	synchronize_net();
	ivl_rx_free_pools(shm);
}

/* ------------------------------------------------------------------ */
/* a peer that misbehaves                                             */

/**
 * ivl_peer_broken() - @peer broke a ring: the lower path until it rejoins
 * @peer: the culprit
 * @why: for the (rate-limited) log
 *
 * Context: any; the table refresh takes it out.
 */
void ivl_peer_broken(struct ivl_peer *peer, const char *why)
{
	if (test_and_set_bit(IVL_PEER_BROKEN, &peer->flags))
		return;
	dev_warn_ratelimited(&peer->shm->pdev->dev,
			     "peer %u: %s; using the lower path until it rejoins\n",
			     peer->id, why);
	queue_work(system_wq, &peer->shm->refresh_work);
}

/**
 * ivl_peer_stalled() - @peer does not read its ring: the lower path for now
 * @priv: ivl0
 * @peer: the peer
 * @why: for the (rate-limited) log
 *
 * Cleared by the refresh once the peer reads again and its ring has room.
 *
 * Context: the peer's TX queue lock.
 */
void ivl_peer_stalled(struct ivl_priv *priv, struct ivl_peer *peer,
		      const char *why)
{
	ivl_assert_txq_held(priv, peer);
	if (test_and_set_bit(IVL_PEER_STALLED, &peer->flags))
		return;
	ivl_stat_inc(priv, peer_stalled);
	dev_warn_ratelimited(&peer->shm->pdev->dev,
			     "peer %u: %s for %u ms; using the lower path\n",
			     peer->id, why, ivl_param_stall_ms);
	queue_work(system_wq, &peer->shm->refresh_work);
}
