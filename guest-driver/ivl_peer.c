// SPDX-License-Identifier: GPL-2.0
/*
 * ivloop peers: my directory slot, the heartbeat, and the RCU peer table
 * rebuilt from the directory.
 *
 * One work item (refresh) does all the rebuilding, under shm->lock.  It is
 * queued by the membership doorbell (vector 0), by the heartbeat timer
 * every IVL_HEARTBEAT_MS, and by the data path when a peer misbehaves.
 * Rebuilding every tick keeps the code to one place; when nothing changed
 * it costs max_peers slot reads.
 *
 * Peers are keyed by directory slot (the ring index).  The doorbell goes
 * to the occupant's QEMU peer ID, read from its slot: the server never
 * reuses an ID but does reuse slots, so a slot whose generation or peer ID
 * changed holds a new peer and gets fresh rings.
 *
 * Table updates follow one rule: rings are (re)attached only while their
 * peer is in no published table and a grace period has passed, so xmit
 * (under rcu_read_lock_bh) and NAPI (under rcu_read_lock) never see a ring
 * change under them.
 */
#include <linux/debugfs.h>
#include <linux/seq_file.h>

#include "ivl.h"

/* Everything read from one slot, once. */
struct ivl_slot_snap {
	u64 gen;
	u64 joined_gen;
	u64 heartbeat;
	u64 leave_ack;
	u32 present;
	u32 peer_id;
	u32 srv_flags;
	u32 state;
	u8 mac[ETH_ALEN] __aligned(2);
	u8 nic_mac[ETH_ALEN] __aligned(2);
	/*
	 * The guest half could not be read stably: @state, @mac and
	 * @joined_gen then say DOWN, and the caller decides what to keep.
	 */
	bool guest_odd;
};

/* A writer preempted mid-update keeps its seq odd for a while: give up soon. */
#define IVL_SNAP_TRIES		4

/* The server's half of slot @id under srv_seq; false if it kept changing. */
static bool ivl_slot_snap_srv(const struct ivl_slot *slot,
			      struct ivl_slot_snap *s)
{
	unsigned int tries;
	u32 seq1, seq2;

	for (tries = 0; tries < IVL_SNAP_TRIES; tries++) {
		/* acquire: the fields below are no older than the counter */
		seq1 = le32_to_cpu(virt_load_acquire(&slot->srv_seq));
		if (seq1 & 1) {
			cpu_relax();
			continue;
		}
		s->present = le32_to_cpu(READ_ONCE(slot->present));
		s->peer_id = le32_to_cpu(READ_ONCE(slot->peer_id));
		s->gen = le64_to_cpu(READ_ONCE(slot->generation));
		s->srv_flags = le32_to_cpu(READ_ONCE(slot->srv_flags));
		memcpy(s->nic_mac, slot->nic_mac, ETH_ALEN);
		/* the copies above complete before the counter is reread */
		virt_rmb();
		seq2 = le32_to_cpu(READ_ONCE(slot->srv_seq));
		if (seq1 == seq2)
			return true;
		cpu_relax();
	}
	return false;
}

/* The guest's half under its seq; false if it stayed odd or kept changing. */
static bool ivl_slot_snap_guest(const struct ivl_slot *slot,
				struct ivl_slot_snap *s)
{
	unsigned int tries;
	u32 seq1, seq2;

	for (tries = 0; tries < IVL_SNAP_TRIES; tries++) {
		/* pairs with the virt_wmb() after the odd seq in ivl_slot_publish() */
		seq1 = le32_to_cpu(virt_load_acquire(&slot->seq));
		if (seq1 & 1) {
			cpu_relax();
			continue;
		}
		s->state = le32_to_cpu(READ_ONCE(slot->state));
		memcpy(s->mac, slot->mac, ETH_ALEN);
		s->joined_gen = le64_to_cpu(READ_ONCE(slot->joined_gen));
		/* the copies above complete before the counter is reread */
		virt_rmb();
		seq2 = le32_to_cpu(READ_ONCE(slot->seq));
		if (seq1 == seq2)
			return true;
		cpu_relax();
	}
	return false;
}

/*
 * Copy slot @id, each half under its own sequence counter (ivl_abi.h).
 * False when the server's half stayed odd or kept changing: the caller
 * keeps its previous view.  The guest's half is read apart from it, so a
 * guest that died or was evicted in the middle of a write (its seq left
 * odd for good) cannot hide what the server says of the slot: gone,
 * evicted, or taken by someone else (s->guest_odd).
 */
static bool ivl_slot_snap(const struct ivl_shm *shm, u32 id,
			  struct ivl_slot_snap *s)
{
	const struct ivl_slot *slot = ivl_slot(shm, id);

	if (!ivl_slot_snap_srv(slot, s))
		return false;
	s->guest_odd = !ivl_slot_snap_guest(slot, s);
	if (s->guest_odd) {
		s->state = IVL_STATE_DOWN;
		eth_zero_addr(s->mac);
		s->joined_gen = U64_MAX;
	}
	/* single words, outside the protocol */
	s->heartbeat = le64_to_cpu(READ_ONCE(slot->heartbeat));
	/* pairs with the release in ivl_leave_ack_publish(): its last records first */
	s->leave_ack = le64_to_cpu(virt_load_acquire(&slot->leave_ack));
	return true;
}

/**
 * ivl_slot_read_nic() - what the server learned about our data NIC
 * @shm: the device being probed, my slot found
 *
 * Sets @shm->nic_mac and @shm->nic_mac_known.
 *
 * Context: probe.
 */
void ivl_slot_read_nic(struct ivl_shm *shm)
{
	struct ivl_slot_snap s;

	shm->nic_mac_known = false;
	if (!ivl_slot_snap(shm, shm->my_slot, &s) ||
	    !(s.srv_flags & IVL_SLOT_F_MAC_KNOWN) ||
	    !is_valid_ether_addr(s.nic_mac))
		return;
	ether_addr_copy(shm->nic_mac, s.nic_mac);
	shm->nic_mac_known = true;
}

/**
 * ivl_slot_publish() - publish my slot's guest half
 * @shm: the device
 * @state: IVL_STATE_DOWN, _UP or _LEAVING
 * @mac: with IVL_STATE_UP, the MAC peers accept frames from
 *
 * Written under the half's seq protocol (ivl_abi.h).  The TX table
 * follows: the refresh it queues builds the table from what is published
 * here (ivl_table_publish()), so no frame goes out while we are not UP.
 *
 * Context: process; takes shm->lock.
 */
void ivl_slot_publish(struct ivl_shm *shm, u32 state, const u8 *mac)
{
	struct ivl_slot *slot = ivl_slot(shm, shm->my_slot);
	u64 gen, hb;

	mutex_lock(&shm->lock);
	shm->my_state = state;
	/* odd: readers retry or keep their view until we are done */
	WRITE_ONCE(slot->seq, cpu_to_le32(++shm->slot_seq));
	/* the odd seq is seen before any field changes (ivl_slot_snap()) */
	virt_wmb();
	if (state == IVL_STATE_UP) {
		memcpy(shm->my_mac, mac, ETH_ALEN);
		memcpy(slot->mac, mac, ETH_ALEN);
		gen = le64_to_cpu(READ_ONCE(slot->generation));
		WRITE_ONCE(slot->joined_gen, cpu_to_le64(gen));
		hb = atomic64_inc_return(&shm->heartbeat);
		WRITE_ONCE(slot->heartbeat, cpu_to_le64(hb));
	}
	WRITE_ONCE(slot->state, cpu_to_le32(state));
	/* every field is written before seq is even again */
	virt_wmb();
	WRITE_ONCE(slot->seq, cpu_to_le32(++shm->slot_seq));
	mutex_unlock(&shm->lock);
	/* up or down, the TX table follows (not while detaching: no priv) */
	queue_work(system_wq, &shm->refresh_work);
}

/*
 * Acknowledge, in my slot, every LEAVING peer I no longer send to.  The
 * caller has made sure no xmit still writes their rings (they left the TX
 * table a grace period ago, or were never in it).  shm->lock.
 */
static void ivl_leave_ack_publish(struct ivl_shm *shm)
{
	struct ivl_slot *slot = ivl_slot(shm, shm->my_slot);
	struct ivl_peer *p;
	u64 ack = 0;

	lockdep_assert_held(&shm->lock);
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p))
		if (p->leaving && !p->tx_on)
			ack |= BIT_ULL(p->id);
	if (ack == shm->leave_ack)
		return;
	shm->leave_ack = ack;
	/* release: our last records in their rings before the ack */
	virt_store_release(&slot->leave_ack, cpu_to_le64(ack));
}

/**
 * ivl_peers_unacked() - peers that may still send to me, not acknowledged
 * @shm: the device, my slot LEAVING
 *
 * Present, joined and UP, without my bit in their leave_ack.  A slot whose
 * server half cannot be read stably counts as not acknowledged; one whose
 * guest half is mid-update counts unless the refresh already judged it
 * gone.
 *
 * Context: process.
 * Return: how many.
 */
u32 ivl_peers_unacked(struct ivl_shm *shm)
{
	struct ivl_slot_snap s;
	struct ivl_peer *p;
	u32 missing = 0;

	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		if (!ivl_slot_snap(shm, p->id, &s)) {
			missing++;
			continue;
		}
		if (s.present != 1 || s.srv_flags & IVL_SLOT_F_EVICTED)
			continue;
		/*
		 * Mid-update: unknown, unless the refresh already judged it
		 * gone (its half stuck odd, ivl_peer_assess()).
		 */
		if (s.guest_odd) {
			if (p->want_rx)
				missing++;
			continue;
		}
		if (s.joined_gen != s.gen || s.state != IVL_STATE_UP)
			continue;
		if (!(s.leave_ack & BIT_ULL(shm->my_slot)))
			missing++;
	}
	return missing;
}

/**
 * ivl_notify_peers() - ring the membership vector of every present peer
 * @shm: the device
 *
 * At each slot's QEMU peer ID, as read from the region: at worst we ring
 * an ID that holds no guest.
 *
 * Context: any.
 */
void ivl_notify_peers(struct ivl_shm *shm)
{
	const struct ivl_slot *slot;
	u32 present, peer_id;
	struct ivl_peer *p;

	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		/* untrusted: at worst we ring an ID that holds no guest */
		slot = ivl_slot(shm, p->id);
		present = le32_to_cpu(READ_ONCE(slot->present));
		peer_id = le32_to_cpu(READ_ONCE(slot->peer_id));
		if (present != 1 || peer_id > IVL_PEER_ID_MAX ||
		    peer_id == shm->my_peer_id)
			continue;
		ivl_doorbell(shm, peer_id, IVL_VEC_MEMBERSHIP);
	}
}

/* Decide from one slot snapshot what the peer may be used for. */
static void ivl_peer_assess(struct ivl_shm *shm, struct ivl_priv *priv,
			    struct ivl_peer *p, unsigned long now)
{
	unsigned long timeout = msecs_to_jiffies(IVL_HEARTBEAT_TIMEOUT_MS);
	struct ivl_slot_snap s;
	bool joined, bad, bad_mac, up, stuck = false;

	if (!ivl_slot_snap(shm, p->id, &s))
		return;		/* mid-update: decide on the next look */
	if (s.guest_odd) {
		/*
		 * Its guest is mid-write, or died there.  The same occupant
		 * gets a heartbeat timeout's grace, then counts as a broken
		 * entry; one that left, was evicted or was replaced is
		 * judged by the server's half at once.
		 */
		if (!p->guest_odd) {
			p->guest_odd = true;
			p->guest_odd_since = now;
		}
		stuck = s.present == 1 && !(s.srv_flags & IVL_SLOT_F_EVICTED) &&
			s.gen == p->seen_gen && s.peer_id == p->seen_peer_id;
		if (stuck && !time_after(now, p->guest_odd_since + timeout))
			return;
	} else {
		p->guest_odd = false;
	}

	if (s.gen != p->seen_gen || s.peer_id != p->seen_peer_id) {
		/* joined or left since we last looked: a fresh record */
		p->seen_gen = s.gen;
		p->seen_peer_id = s.peer_id;
		p->hb_last = s.heartbeat;
		p->hb_stamp = now;
		p->hb_dead = false;
		clear_bit(IVL_PEER_BROKEN, &p->flags);
		clear_bit(IVL_PEER_STALLED, &p->flags);
	} else if (s.heartbeat != p->hb_last) {
		p->hb_last = s.heartbeat;
		p->hb_stamp = now;
		if (p->hb_dead)
			dev_info_ratelimited(&shm->pdev->dev,
					     "peer %u: heartbeat resumed\n",
					     p->id);
		p->hb_dead = false;
	}

	/* an evicted occupant is absent, whatever it still writes */
	joined = s.present == 1 && !(s.srv_flags & IVL_SLOT_F_EVICTED) &&
		 s.joined_gen == s.gen;
	up = joined && s.state == IVL_STATE_UP;
	/* an ID the doorbell cannot address, or mine, is a broken entry */
	bad = stuck || s.present > 1 || s.state > IVL_STATE_LEAVING ||
	      s.srv_flags & ~IVL_SLOT_KNOWN_FLAGS ||
	      (up && !is_valid_ether_addr(s.mac)) ||
	      (joined && (s.peer_id > IVL_PEER_ID_MAX ||
			  s.peer_id == shm->my_peer_id));
	if (bad && !p->bad_entry) {
		ivl_stat_inc_bh(priv, peer_bad_entry);
		dev_warn_ratelimited(&shm->pdev->dev,
				     "peer %u: bad directory entry (present %u peer_id %u state %u mac %pM)\n",
				     p->id, s.present, s.peer_id, s.state, s.mac);
	}
	p->bad_entry = bad;

	/*
	 * The server saw this occupant's NIC: a slot claiming another MAC
	 * (another host's VM, the gateway) would pull that traffic into its
	 * ring.  It gets nothing, until the server evicts it.
	 */
	bad_mac = joined &&
		  (s.state == IVL_STATE_UP || s.state == IVL_STATE_LEAVING) &&
		  (s.srv_flags & IVL_SLOT_F_MAC_KNOWN) &&
		  !ether_addr_equal(s.mac, s.nic_mac);
	if (bad_mac && !p->bad_mac) {
		ivl_stat_inc_bh(priv, peer_bad_mac);
		dev_warn_ratelimited(&shm->pdev->dev,
				     "peer %u: claims MAC %pM but its NIC is %pM; not sending to it\n",
				     p->id, s.mac, s.nic_mac);
	}
	p->bad_mac = bad_mac;
	p->leaving = joined && s.state == IVL_STATE_LEAVING;

	if (up && !p->hb_dead && time_after(now, p->hb_stamp + timeout)) {
		p->hb_dead = true;
		ivl_stat_inc_bh(priv, peer_timeout);
		dev_warn_ratelimited(&shm->pdev->dev,
				     "peer %u: no heartbeat for %u ms\n",
				     p->id, IVL_HEARTBEAT_TIMEOUT_MS);
	}

	/* a LEAVING peer still gets its last frames read, but none sent */
	p->want_rx = joined && !bad && !bad_mac &&
		     !test_bit(IVL_PEER_BROKEN, &p->flags) &&
		     (s.state == IVL_STATE_UP || s.state == IVL_STATE_LEAVING);
	p->want_tx = p->want_rx && s.state == IVL_STATE_UP && !p->hb_dead;
	memcpy(p->new_mac, s.mac, ETH_ALEN);
}

/* Two senders claiming one MAC (or mine) get neither: the lower path is safe. */
static void ivl_peers_mark_dups(struct ivl_shm *shm)
{
	struct ivl_peer *p, *q;

	lockdep_assert_held(&shm->lock);
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p))
		p->dup_mac = false;
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		if (!p->want_tx)
			continue;
		if (ether_addr_equal(p->new_mac, shm->my_mac))
			p->dup_mac = true;
		for (q = ivl_peer_next(shm, p); q; q = ivl_peer_next(shm, q)) {
			if (q->want_tx && ether_addr_equal(p->new_mac, q->new_mac)) {
				p->dup_mac = true;
				q->dup_mac = true;
			}
		}
	}
}

/* While my own slot is not UP, peers do not take my frames: none go out. */
static bool ivl_peer_tx_wanted(const struct ivl_peer *p)
{
	return p->want_tx && !p->dup_mac && p->shm->my_state == IVL_STATE_UP;
}

/*
 * Attach both rings of @p for its current slot generation.  @p is in no
 * published table and a grace period has passed: nobody else uses them.
 */
static int ivl_peer_attach(struct ivl_shm *shm, struct ivl_priv *priv,
			   struct ivl_peer *p)
{
	struct ivl_ring_ctrl *tx_ctrl = ivl_ring_base(shm, shm->my_slot, p->id);
	void *rx_base = ivl_ring_base(shm, p->id, shm->my_slot);
	struct netdev_queue *txq = ivl_peer_txq(priv, p);
	int err;

	/* the TX flow-control timer may look at p->tx: take its lock */
	__netif_tx_lock_bh(txq);
	/*
	 * The peer rejoined: the server zeroed this ring, but we may have
	 * published into it before we noticed.  The prod is ours; restart
	 * it at the fresh consumer's cons so those records are never parsed.
	 */
	if (p->attached)
		err = ivl_ring_restart_producer(&p->tx, tx_ctrl, shm->ring_size);
	else
		err = ivl_ring_attach_producer(&p->tx, tx_ctrl, shm->ring_size);
	p->tx_cons_seen = p->tx.prod;
	p->tx_cons_stamp = jiffies;
	/* checked <= IVL_PEER_ID_MAX by ivl_peer_assess() (want_rx) */
	p->peer_id = p->seen_peer_id;
	__netif_tx_unlock_bh(txq);
	if (!err)
		err = ivl_ring_attach_consumer(&p->rx, rx_base, shm->ring_size);
	if (err) {
		p->attached = false;
		p->want_rx = false;
		p->want_tx = false;
		ivl_peer_broken(p, "cannot attach its rings");
		return err;
	}
	/*
	 * A zeroed ring has need_kick clear, so the peer would never ring
	 * us: ask for kicks now.  NAPI is scheduled after the table is
	 * published and picks up anything already there.
	 */
	ivl_ring_enable_kick(&p->rx);
	p->rx_armed = true;
	p->attached = true;
	p->gen = p->seen_gen;
	clear_bit(IVL_PEER_STALLED, &p->flags);
	return 0;
}

static void ivl_peer_announce(struct ivl_shm *shm, struct ivl_priv *priv,
			      struct ivl_peer *p, bool tx)
{
	if (tx == p->tx_on)
		return;
	if (tx) {
		ivl_stat_inc_bh(priv, peer_up);
		dev_info_ratelimited(&shm->pdev->dev,
				     "peer %u (%pM): shared-memory path up\n",
				     p->id, p->new_mac);
	} else {
		ivl_stat_inc_bh(priv, peer_down);
		dev_info_ratelimited(&shm->pdev->dev,
				     "peer %u (%pM): using the lower path\n",
				     p->id, p->mac);
	}
}

/*
 * Publish a new table.  @final: what the directory asks for.  Otherwise
 * the intersection of the current table and the final one, so that peers
 * leaving or needing new rings can be taken out first.  On allocation
 * failure publish no table at all (everything lower) and return false.
 */
static bool ivl_table_publish(struct ivl_shm *shm, struct ivl_priv *priv,
			      bool final)
{
	struct ivl_peer_table *old = ivl_table_locked(shm);
	struct ivl_peer_table *t;
	struct ivl_peer *p;
	bool rx, tx;

	lockdep_assert_held(&shm->lock);
	t = kzalloc(sizeof(*t), GFP_KERNEL);
	if (t)
		ether_addr_copy(t->src, shm->my_mac);
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		rx = p->want_rx && p->attached;
		tx = ivl_peer_tx_wanted(p) && p->attached;
		if (!final) {
			rx = rx && p->rx_on && !p->reattach &&
			     ether_addr_equal(p->rx_mac, p->new_mac);
			tx = tx && p->tx_on && !p->reattach &&
			     ether_addr_equal(p->mac, p->new_mac);
		}
		if (!t) {
			rx = false;
			tx = false;
		}
		/* downs show in the intermediate table, ups in the final */
		ivl_peer_announce(shm, priv, p, tx);
		if (rx) {
			/* NAPI checks sources against it: set while out */
			if (!p->rx_on)
				memcpy(p->rx_mac, p->new_mac, ETH_ALEN);
			t->rx[t->nr_rx++] = p;
			t->rx_map |= BIT_ULL(p->id);
		}
		if (tx) {
			memcpy(p->mac, p->new_mac, ETH_ALEN);
			memcpy(t->tx[t->nr_tx].mac, p->mac, ETH_ALEN);
			t->tx[t->nr_tx++].peer = p;
		}
		WRITE_ONCE(p->rx_on, rx);
		WRITE_ONCE(p->tx_on, tx);
	}
	/* Release: the table's contents before the pointer (rcu_dereference). */
	rcu_assign_pointer(shm->table, t);
	if (old)
		kfree_rcu(old, rcu);
	return !!t;
}

/* The slot holds another occupant than the one the rings are attached for. */
static bool ivl_peer_moved(const struct ivl_peer *p)
{
	return p->gen != p->seen_gen || p->peer_id != p->seen_peer_id;
}

/*
 * TX lock held, ring sane.  Did the peer show it reads our ring since the
 * last look?  A peer that is UP with a live heartbeat may still not read it
 * (it has not noticed us yet, or its NAPI is wedged): frames would vanish
 * into the ring while the ring has room, so waiting for a full ring is not
 * enough.  It reads when its cons moved or our ring is empty; while we do
 * not send to it there is nothing to judge.  @tx_cons_stamp is the last
 * time it did.
 */
static bool ivl_peer_progressed(struct ivl_peer *p, unsigned long now)
{
	u32 cons = p->tx.other;		/* read by ivl_ring_check_producer() */

	if (p->tx_on && cons == p->tx_cons_seen && cons != p->tx.prod)
		return false;
	p->tx_cons_seen = cons;
	p->tx_cons_stamp = now;
	return true;
}

/* The peer's TX queue lock held. */
static void ivl_peer_tx_check(struct ivl_priv *priv, struct ivl_peer *p,
			      unsigned long now, unsigned long stall)
{
	bool progressed;

	ivl_assert_txq_held(priv, p);
	if (ivl_ring_check_producer(&p->tx)) {
		if (!test_bit(IVL_PEER_BROKEN, &p->flags))
			ivl_stat_inc(priv, tx_bad_ring);
		ivl_peer_broken(p, "bad consumer index in our ring");
		p->want_rx = false;
		p->want_tx = false;
		return;
	}
	progressed = ivl_peer_progressed(p, now);
	if (!test_bit(IVL_PEER_STALLED, &p->flags)) {
		if (time_after(now, p->tx_cons_stamp + stall))
			ivl_peer_stalled(priv, p, "does not read its ring");
	} else if (progressed && ivl_ring_has_room(&p->tx, IVL_MAX_FRAME)) {
		clear_bit(IVL_PEER_STALLED, &p->flags);
	}
}

/*
 * After ivl_peer_assess(), under each peer's TX queue lock: notice
 * producer rings the peer broke or stopped reading, and let stalled peers
 * back once they consume and their ring has room again.
 */
static void ivl_peers_tx_check(struct ivl_shm *shm, struct ivl_priv *priv)
{
	struct netdev_queue *txq;
	unsigned long stall = msecs_to_jiffies(ivl_param_stall_ms);
	unsigned long now = jiffies;
	struct ivl_peer *p;

	lockdep_assert_held(&shm->lock);
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		/* a rejoined peer's ring was zeroed: it gets new rings anyway */
		if (!p->attached || ivl_peer_moved(p))
			continue;
		txq = ivl_peer_txq(priv, p);
		__netif_tx_lock_bh(txq);
		ivl_peer_tx_check(priv, p, now, stall);
		__netif_tx_unlock_bh(txq);
	}
}

/* Peers up without receive state, or out of the table with it: sync them. */
static void ivl_rx_sync_check(struct ivl_shm *shm)
{
	struct ivl_peer *p;

	lockdep_assert_held(&shm->lock);
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		if (p->up != p->rx_ready && !p->rx_on) {
			/* under shm->lock: ivl_peers_stop() stops the requeueing */
			queue_delayed_work(system_wq, &shm->rx_work, 0);
			return;
		}
	}
}

static void ivl_refresh_locked(struct ivl_shm *shm, struct ivl_priv *priv)
{
	unsigned long now = jiffies;
	bool changed = shm->table_dirty;
	bool drop = false;
	struct ivl_peer *p;
	bool tx, macs, rx_macs;

	lockdep_assert_held(&shm->lock);
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p))
		ivl_peer_assess(shm, priv, p, now);
	ivl_peers_tx_check(shm, priv);
	ivl_peers_mark_dups(shm);
	/* a peer without its NAPI and pool yet waits for ivl_rx_work() */
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		p->up = p->want_rx;
		if (!p->rx_ready) {
			p->want_rx = false;
			p->want_tx = false;
		}
	}

	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		tx = ivl_peer_tx_wanted(p);
		p->reattach = (p->want_rx || tx) &&
			      (!p->attached || ivl_peer_moved(p));
		macs = ether_addr_equal(p->mac, p->new_mac);
		rx_macs = ether_addr_equal(p->rx_mac, p->new_mac);
		if (p->rx_on != p->want_rx || p->tx_on != tx || p->reattach ||
		    (tx && !macs) || (p->want_rx && !rx_macs))
			changed = true;
		if ((p->rx_on && (!p->want_rx || p->reattach || !rx_macs)) ||
		    (p->tx_on && (!tx || p->reattach || !macs)))
			drop = true;
	}
	if (!changed) {
		ivl_leave_ack_publish(shm);
		ivl_rx_sync_check(shm);
		return;
	}

	if (drop) {
		ivl_table_publish(shm, priv, false);
		/* no xmit or NAPI still uses a ring of a peer taken out */
		synchronize_rcu();
	}
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p))
		if (p->reattach)
			ivl_peer_attach(shm, priv, p);
	shm->table_dirty = !ivl_table_publish(shm, priv, true);
	/* a peer taken out above is a grace period behind us now */
	ivl_leave_ack_publish(shm);

	/* read what new rings already hold, and re-arm their kicks */
	local_bh_disable();
	ivl_napi_schedule_rx(priv, shm, false);
	local_bh_enable();
	/* a ring that stopped a queue may belong to a peer now gone */
	ivl_tx_wake_check(priv, shm);
	ivl_rx_sync_check(shm);
}

static void ivl_refresh_work(struct work_struct *work)
{
	struct ivl_shm *shm = container_of(work, struct ivl_shm, refresh_work);

	mutex_lock(&shm->lock);
	if (shm->priv && !shm->stopping)
		ivl_refresh_locked(shm, shm->priv);
	mutex_unlock(&shm->lock);
}

/*
 * NAPI instances are added and deleted under rtnl, but ivl_peers_stop()
 * cancels this work holding rtnl: try, and come back a jiffy later.
 */
static void ivl_rx_work(struct work_struct *work)
{
	struct ivl_shm *shm = container_of(to_delayed_work(work),
					   struct ivl_shm, rx_work);

	if (!rtnl_trylock()) {
		queue_delayed_work(system_wq, &shm->rx_work, 1);
		return;
	}
	mutex_lock(&shm->lock);
	if (shm->priv && !shm->stopping && ivl_rx_sync(shm->priv, shm))
		queue_work(system_wq, &shm->refresh_work);
	mutex_unlock(&shm->lock);
	rtnl_unlock();
}

static void ivl_hb_timer_fn(struct timer_list *t)
{
	struct ivl_shm *shm = from_timer(shm, t, hb_timer);
	struct ivl_slot *slot = ivl_slot(shm, shm->my_slot);
	u64 hb = atomic64_inc_return(&shm->heartbeat);

	WRITE_ONCE(slot->heartbeat, cpu_to_le64(hb));
	/* the refresh also checks the peers' heartbeats */
	queue_work(system_wq, &shm->refresh_work);
	mod_timer(&shm->hb_timer, jiffies + msecs_to_jiffies(IVL_HEARTBEAT_MS));
}

/**
 * ivl_peers_init() - initialise the peer array, the lock, work and timers
 * @shm: the device being probed, @shm->peers allocated
 *
 * Context: probe.
 */
void ivl_peers_init(struct ivl_shm *shm)
{
	struct ivl_peer *p;
	u32 id;

	mutex_init(&shm->lock);
	INIT_WORK(&shm->refresh_work, ivl_refresh_work);
	INIT_DELAYED_WORK(&shm->rx_work, ivl_rx_work);
	timer_setup(&shm->hb_timer, ivl_hb_timer_fn, 0);
	atomic64_set(&shm->heartbeat, 0);
	for (id = 0; id < shm->max_peers; id++) {
		p = &shm->peers[id];
		p->shm = shm;
		p->id = id;
		hrtimer_init(&p->tx_timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL_SOFT);
		p->tx_timer.function = ivl_tx_timer_fn;
		u64_stats_init(&p->tx_stats.syncp);
		u64_stats_init(&p->rx_stats.syncp);
	}
}

/**
 * ivl_peers_start() - start a session with @priv
 * @shm: the device
 * @priv: the ivl0 it is attached to
 *
 * Forgets ring state from any earlier session and starts the heartbeat
 * and the table refresh.
 *
 * Context: rtnl.
 */
void ivl_peers_start(struct ivl_shm *shm, struct ivl_priv *priv)
{
	struct ivl_peer *p;
	u32 id;

	ASSERT_RTNL();
	mutex_lock(&shm->lock);
	for (id = 0; id < shm->max_peers; id++) {
		p = &shm->peers[id];
		p->flags = 0;
		p->seen_gen = U64_MAX;	/* first look counts as a join */
		p->seen_peer_id = U32_MAX;
		p->attached = false;
		p->up = false;
		p->rx_on = false;
		p->tx_on = false;
		p->leaving = false;
		p->bad_mac = false;
		eth_zero_addr(p->mac);
		eth_zero_addr(p->rx_mac);
	}
	shm->leave_ack = 0;
	WRITE_ONCE(ivl_slot(shm, shm->my_slot)->leave_ack, 0);
	shm->table_dirty = false;
	shm->stopping = false;
	/* IRQ handlers read it locklessly: see ivl_detach() for the clear */
	WRITE_ONCE(shm->priv, priv);
	mutex_unlock(&shm->lock);

	mod_timer(&shm->hb_timer, jiffies + msecs_to_jiffies(IVL_HEARTBEAT_MS));
	queue_work(system_wq, &shm->refresh_work);
}

/**
 * ivl_peers_stop() - stop rebuilding and publish an empty table
 * @shm: the device
 *
 * The caller waits for a grace period before touching rings.  Peers keep
 * rx_on/attached so the caller can drain them.
 *
 * Context: rtnl; waits for the heartbeat timer and the refresh work.
 */
void ivl_peers_stop(struct ivl_shm *shm)
{
	struct ivl_peer_table *old;

	ASSERT_RTNL();
	mutex_lock(&shm->lock);
	shm->stopping = true;
	old = ivl_table_locked(shm);
	RCU_INIT_POINTER(shm->table, NULL);
	mutex_unlock(&shm->lock);
	if (old)
		kfree_rcu(old, rcu);

	/* the timer queues the work: stop it first */
	del_timer_sync(&shm->hb_timer);
	cancel_work_sync(&shm->refresh_work);
	/* never waits for rtnl, which we hold: it only tries */
	cancel_delayed_work_sync(&shm->rx_work);
}

/* --- debugfs: /sys/kernel/debug/ivloop/<pci name>/peers --- */

static const char *ivl_peer_state(const struct ivl_peer *p)
{
	if (test_bit(IVL_PEER_BROKEN, &p->flags))
		return "broken";
	if (test_bit(IVL_PEER_STALLED, &p->flags))
		return "stalled";
	if (p->tx_on)
		return "up";
	if (p->bad_entry)
		return "bad-entry";
	if (p->bad_mac)
		return "bad-mac";
	if (p->dup_mac)
		return "dup-mac";
	if (p->hb_dead)
		return "timeout";
	if (p->rx_on)
		return "rx-only";
	return "down";
}

static void ivl_peer_stats_read(const struct ivl_peer_stats *ps,
				u64 *packets, u64 *bytes)
{
	unsigned int start;

	do {
		start = u64_stats_fetch_begin(&ps->syncp);
		*packets = u64_stats_read(&ps->packets);
		*bytes = u64_stats_read(&ps->bytes);
	} while (u64_stats_fetch_retry(&ps->syncp, start));
}

static int ivl_peers_show(struct seq_file *m, void *v)
{
	struct ivl_shm *shm = m->private;
	u64 txp, txb, rxp, rxb;
	struct ivl_peer *p;

	mutex_lock(&shm->lock);
	seq_printf(m, "# my_slot %u my_peer_id %u max_peers %u ring_size %u attached %s\n",
		   shm->my_slot, shm->my_peer_id, shm->max_peers, shm->ring_size,
		   shm->priv && !shm->stopping ? "yes" : "no");
	/* id is the slot; the harness parses the first three columns */
	seq_puts(m, "# id mac state gen tx_packets tx_bytes rx_packets rx_bytes peer_id\n");
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		if (!p->attached && !p->want_rx)
			continue;
		ivl_peer_stats_read(&p->tx_stats, &txp, &txb);
		ivl_peer_stats_read(&p->rx_stats, &rxp, &rxb);
		seq_printf(m, "%u %pM %s %llu %llu %llu %llu %llu %u\n",
			   p->id, p->tx_on ? p->mac : p->new_mac,
			   ivl_peer_state(p), p->gen, txp, txb, rxp, rxb,
			   p->attached ? p->peer_id : p->seen_peer_id);
	}
	mutex_unlock(&shm->lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(ivl_peers);

/**
 * ivl_peers_debugfs_add() - ivloop/<pci name>/peers in debugfs
 * @shm: the device
 *
 * The harness reads it; debugfs is optional, errors are ignored.
 *
 * Context: probe.
 */
void ivl_peers_debugfs_add(struct ivl_shm *shm)
{
	/* ERR_PTR-tolerant, like the root: debugfs is optional */
	shm->dbg_dir = debugfs_create_dir(pci_name(shm->pdev), ivl_debugfs_root);
	debugfs_create_file("peers", 0444, shm->dbg_dir, shm, &ivl_peers_fops);
}
