/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ivloop: shared-memory fast path between co-resident QEMU guests.
 *
 * Two objects meet here:
 *  - struct ivl_priv: an upper netdev ("ivl0") stacked on one of the
 *    guest's NICs (rtnl_link_ops kind "ivloop").  It exists with or
 *    without a device.
 *  - struct ivl_shm: one ivshmem-doorbell PCI function (1af4:1110) with the
 *    mapped region, the peer array and the RCU peer table.
 * A guest may have several of each (one region per trust group).  Under
 * rtnl, a device pairs with the upper stacked on the NIC whose MAC the
 * server saw for this QEMU, or with any free upper when the server could
 * not tell (ivl_pair_shm(), ivl_attach()).
 *
 * Lock order: rtnl -> ivl_shm.lock -> a peer's TX queue lock -> the lower
 * device's TX queue lock.
 */
#ifndef IVL_H
#define IVL_H

#include <linux/bitmap.h>
#include <linux/completion.h>
#include <linux/etherdevice.h>
#include <linux/hrtimer.h>
#include <linux/if_vlan.h>
#include <linux/mutex.h>
#include <linux/netdevice.h>
#include <linux/pci.h>
#include <linux/rcupdate.h>
#include <linux/rtnetlink.h>
#include <linux/timer.h>
#include <linux/u64_stats_sync.h>
#include <linux/workqueue.h>
#include <net/rtnetlink.h>

#include "ivl_abi.h"
#include "ivl_compat.h"
#include "ivl_ring.h"

#define IVL_DRV_NAME		"ivloop"
#define IVL_LINK_KIND		"ivloop"

#define IVL_GSO_MAX_SIZE	65536U
/* Frames up to this size are received into one linear skb. */
#define IVL_RX_LINEAR_MAX	2048U
/* Larger frames: this many bytes linear (headers), the rest in pages. */
#define IVL_RX_HEAD		256U
/* ... in compound pages of up to this order (the per-CPU lists' limit). */
#define IVL_RX_ORDER		3U
/* TX flow control: ring-full poll interval, doubling up to the max. */
#define IVL_TX_POLL_MIN_US	20U
#define IVL_TX_POLL_MAX_US	1000U

/* Counters: per CPU, written with BH disabled, never reset. */
struct ivl_stats {
	u64_stats_t shm_tx_packets;
	u64_stats_t shm_tx_bytes;
	u64_stats_t shm_rx_packets;
	u64_stats_t shm_rx_bytes;
	u64_stats_t lower_tx_packets;
	u64_stats_t lower_tx_bytes;
	u64_stats_t lower_rx_packets;
	u64_stats_t lower_rx_bytes;
	u64_stats_t doorbells_sent;
	u64_stats_t doorbells_suppressed;
	u64_stats_t space_kicks_sent;	/* consumer told a producer "room again" */
	u64_stats_t ring_full;		/* queue stopped on a full ring */
	u64_stats_t tx_wakeups;
	u64_stats_t tx_no_room;		/* reserve failed anyway: sent lower */
	u64_stats_t tx_stalled_lower;	/* for a stalled or broken peer: sent lower */
	u64_stats_t tx_foreign_src;	/* to a peer, from a MAC not ivl0's: sent lower */
	u64_stats_t tx_offload_lower;	/* offloads a record cannot carry: sent lower */
	u64_stats_t tx_lower_drops;	/* lower dev_queue_xmit refused */
	u64_stats_t tx_bad_ring;	/* peer broke the cons of our ring */
	u64_stats_t rx_bad_record;	/* ring broken by the peer */
	u64_stats_t rx_bad_offload;	/* offload metadata rejected */
	u64_stats_t rx_runt;		/* frame shorter than an Ethernet header */
	u64_stats_t rx_alloc_fail;
	u64_stats_t rx_lower_drops;	/* skb_share_check failed */
	u64_stats_t rx_bad_src;		/* source MAC not the ring owner's */
	u64_stats_t rx_leave_lost;	/* records left unread at detach */
	u64_stats_t leave_ack_timeouts;	/* peers that never acked our LEAVING */
	u64_stats_t peer_up;		/* peer usable for sending */
	u64_stats_t peer_down;		/* peer no longer usable */
	u64_stats_t peer_timeout;	/* heartbeat stopped */
	u64_stats_t peer_stalled;	/* ring stayed full too long */
	u64_stats_t peer_bad_entry;	/* broken directory slot */
	u64_stats_t peer_bad_mac;	/* claims a MAC its NIC does not have */
	u64_stats_t peer_rx_made;	/* a peer up got its NAPI and pool ... */
	u64_stats_t peer_rx_freed;	/* ... and one gone gave them back */
	u64_stats_t poll_windows;	/* the ring poller started polling */
	u64_stats_t poll_hits;		/* ... and found records before a doorbell */
	u64_stats_t poll_starved;	/* nobody could watch: doorbells for a while */
	u64_stats_t poll_watchdog;	/* the watchdog found the poller away */
	u64_stats_t poll_stolen;	/* host short of cores: polling paused */
};

struct ivl_pcpu_stats {
	struct ivl_stats s;
	struct u64_stats_sync syncp;
};

/* Per-peer, per-direction counters; one writer each (TX lock, NAPI). */
struct ivl_peer_stats {
	u64_stats_t packets;
	u64_stats_t bytes;
	struct u64_stats_sync syncp;
};

/* ivl_peer.flags: set from any context, read locklessly in xmit. */
enum {
	IVL_PEER_BROKEN,	/* peer broke the ring: lower path until it rejoins */
	IVL_PEER_STALLED,	/* our ring to it stayed full: lower path for now */
};

struct ivl_shm;

/*
 * One other directory slot, whoever occupies it.  Lives as long as the
 * ivl_shm, so the TX flow-control state may point at it without RCU.  A
 * slot is reused by the server; a new occupant (new slot generation or
 * new QEMU peer ID) gets new rings.
 */
struct ivl_peer {
	struct ivl_shm *shm;
	u32 id;				/* slot index: rings and tables */
	unsigned long flags;		/* IVL_PEER_*, atomic bitops */

	/* protected by shm->lock (refresh work) */
	u8 mac[ETH_ALEN] __aligned(2);	/* MAC the table was built with */
	u8 new_mac[ETH_ALEN] __aligned(2);
	u64 gen;			/* slot generation the rings are attached for */
	u64 seen_gen;			/* last slot generation read */
	u32 seen_peer_id;		/* last QEMU peer ID read (checked) */
	u64 hb_last;
	unsigned long hb_stamp;		/* jiffies when hb_last changed */
	bool attached;			/* rings attached (for @gen) */
	/*
	 * NAPI added and page pool made (ivl_rx_sync()): only for a peer
	 * that is up, so a guest pays for the peers it has, not the slots.
	 * Written under rtnl and shm->lock; either one reads it.
	 */
	bool rx_ready;
	bool up;			/* joined, sound, UP or LEAVING */
	bool want_rx, want_tx, reattach;
	bool hb_dead, bad_entry, dup_mac;
	bool guest_odd;			/* its half of the slot is mid-update ... */
	unsigned long guest_odd_since;	/* ... since then (jiffies) */
	bool bad_mac;			/* slot MAC is not the server-seen NIC's */
	bool leaving;			/* slot says LEAVING: we ack once out */
	/* written under shm->lock, read locklessly (TX flow control) */
	bool rx_on;			/* in table->rx: NAPI polls it */
	bool tx_on;			/* in table->tx: xmit may use it */

	/*
	 * QEMU peer ID of the occupant the rings are attached for: the
	 * doorbell target.  Set with the rings (ivl_peer_attach()), so the
	 * data path, which only sees peers in a published table, reads a
	 * value that does not change under it.
	 */
	u32 peer_id;

	/* producer side, protected by this peer's TX queue lock (ivl_peer_txq) */
	struct ivl_ring tx;
	struct ivl_peer_stats tx_stats;
	u32 tx_cons_seen;		/* the peer's cons at @tx_cons_stamp */
	unsigned long tx_cons_stamp;	/* jiffies: last sign the peer consumes */
	bool tx_stopped;		/* our queue to it waits for room; lockless reads */
	bool kick_pending;		/* doorbell deferred by xmit_more */
	unsigned long stop_since;	/* jiffies */
	unsigned int stop_backoff_us;
	struct hrtimer tx_timer;	/* polls a full ring for room */

	/* consumer side, owned by NAPI (or by detach with NAPI disabled) */
	struct napi_struct napi;	/* on the paired ivl0 while attached */
	struct page_pool *rx_pool;	/* IVL_RX_ORDER pages; NULL: page allocator */
	struct ivl_ring rx;
	/* frames from the ring must come from it; changes only while !rx_on */
	u8 rx_mac[ETH_ALEN] __aligned(2);
	struct ivl_peer_stats rx_stats;
	bool rx_armed;			/* need_kick set on @rx */
};

struct ivl_route {
	u8 mac[ETH_ALEN];
	u16 pad;			/* ether_addr_equal_64bits() reads 8 bytes */
	struct ivl_peer *peer;
};

/* Immutable once published; replaced whole under RCU. */
struct ivl_peer_table {
	struct rcu_head rcu;
	/*
	 * The source MAC peers accept from us: the one published in our
	 * slot.  Frames from any other (a container's, a bridge's) go lower.
	 */
	u8 src[ETH_ALEN];
	u16 src_pad;			/* ether_addr_equal_64bits() reads 8 bytes */
	unsigned int nr_tx;
	unsigned int nr_rx;
	u64 rx_map;			/* BIT_ULL(slot) for every peer in @rx */
	struct ivl_route tx[IVL_MAX_PEERS];
	struct ivl_peer *rx[IVL_MAX_PEERS];
};

struct ivl_priv;

/* The ivshmem-doorbell PCI function and the region it maps. */
struct ivl_shm {
	struct pci_dev *pdev;
	void __iomem *regs;		/* BAR0 */
	void *region;			/* BAR2, memremap(WB): guest RAM */

	/* header fields, read once and validated at probe; never reread */
	u64 region_size;
	u64 rings_offset;
	u64 ring_stride;
	u32 max_peers;
	u32 ring_size;
	u32 my_slot;			/* directory slot, ring index */
	u32 my_peer_id;			/* IVPosition: QEMU peer ID */
	struct completion dir_changed;	/* membership doorbell (probe) */

	struct ivl_peer *peers;		/* [max_peers] */
	struct ivl_peer_table __rcu *table;	/* NULL: everything lower */

	struct list_head node;		/* in ivl_shms, rtnl */
	struct ivl_priv *upper;		/* paired upper, rtnl */
	bool nic_mac_known;		/* the server saw our data NIC ... */
	u8 nic_mac[ETH_ALEN] __aligned(2);	/* ... with this MAC */

	/* peers' table state, @priv, @stopping, my slot's guest half */
	struct mutex lock;
	struct ivl_priv *priv;		/* attached upper; READ_ONCE in IRQs */
	bool stopping;			/* refresh work must not run */
	bool table_dirty;		/* last rebuild failed: retry */
	u8 my_mac[ETH_ALEN] __aligned(2);	/* as published in my slot */
	u32 my_state;			/* as published: we send only while UP */
	u32 slot_seq;			/* my slot's seq: ours, never read back */
	u64 leave_ack;			/* as published in my slot (shm->lock) */

	struct work_struct refresh_work;
	struct delayed_work rx_work;	/* ivl_rx_sync() under rtnl */
	struct timer_list hb_timer;
	atomic64_t heartbeat;
	struct dentry *dbg_dir;		/* ivloop/<pci name>/ */
};

/* The upper netdev's private area. */
struct ivl_priv {
	struct net_device *dev;
	struct list_head node;		/* in ivl_uppers, rtnl */
	struct net_device *lower;	/* stable while registered */
	netdevice_tracker lower_tracker;
	struct ivl_shm __rcu *shm;	/* written under rtnl */
	struct ivl_pcpu_stats __percpu *stats;
	unsigned long flags;		/* IVL_F_*, atomic bitops */

	/* rtnl */
	bool napi_on;
	bool upper_linked;
	bool rx_handler_on;
	unsigned long vids[BITS_TO_LONGS(VLAN_N_VID)];	/* 802.1Q IDs given lower */

	/*
	 * Ring poller (ivl_poll.c).  Times are local_clock() ns, written from
	 * xmit, NAPI and the poller without a common lock: a lost update
	 * misjudges a window, never loses a frame (IVL_F_POLLING decides).
	 */
	struct task_struct *poller;
	u64 poll_ns;			/* window length, adaptive */
	u64 poll_opened;		/* when the current window opened */
	u64 poll_last;			/* ... or was last extended */
	u64 poll_tx;			/* last frame sent over shm */
	u64 poll_rx;			/* last frames received from rings */
	u64 poll_looked;		/* poller polled or we sent: not starved */
	u64 poll_starved;		/* until then, kicks on whenever we yield */
	u64 poll_stolen;		/* until then, no windows: the host is short of cores */
	u64 poll_theft;			/* the host last took our spin (poller) */
	bool poll_missed;		/* the last window heard nothing */
	u32 poll_max_us;		/* ethtool rx-usecs: longest window */
	struct hrtimer poll_watchdog;	/* frames never wait unwatched for long */
};

enum {
	IVL_F_FORCE_LOWER,		/* ethtool priv flag "force-lower" */
	IVL_F_POLL_OPEN,		/* a poll window is open: poller runs */
	IVL_F_POLLING,			/* the poller watches the rings: no kicks */
};

/* Longest ring-poll window, rx-usecs (ethtool -C) and poll_us. */
#define IVL_POLL_US_MAX		10000U

/* Module parameters (ivl_main.c): defaults for new devices. */
extern bool ivl_param_force_lower;
extern unsigned int ivl_param_stall_ms;
extern unsigned int ivl_param_poll_us;

/* Every upper and every device, for pairing; rtnl. */
extern struct list_head ivl_uppers;
extern struct list_head ivl_shms;
extern struct dentry *ivl_debugfs_root;

/* --- accessors named for their lock context --- */

static inline struct ivl_shm *ivl_shm_rtnl(const struct ivl_priv *priv)
{
	return rtnl_dereference(priv->shm);
}

/* ndo_start_xmit runs under rcu_read_lock_bh() (dev_queue_xmit). */
static inline struct ivl_shm *ivl_shm_rcu_bh(const struct ivl_priv *priv)
{
	return rcu_dereference_bh(priv->shm);
}

static inline struct ivl_shm *ivl_shm_rcu(const struct ivl_priv *priv)
{
	return rcu_dereference(priv->shm);
}

static inline struct ivl_peer_table *ivl_table_rcu_bh(const struct ivl_shm *shm)
{
	return rcu_dereference_bh(shm->table);
}

static inline struct ivl_peer_table *ivl_table_rcu(const struct ivl_shm *shm)
{
	return rcu_dereference(shm->table);
}

static inline struct ivl_peer_table *ivl_table_locked(const struct ivl_shm *shm)
{
	return rcu_dereference_protected(shm->table,
					 lockdep_is_held(&shm->lock));
}

/*
 * TX queues: 0 for the lower NIC, then one per peer slot, so a full ring
 * stops only the queue of the peer it belongs to.  Each queue costs a
 * qdisc (fq_codel: ~70 KiB), so ivl0 has 1 + 16 by default, enough for a
 * region of 16 slots; `ip link add ... numtxqueues N` gives up to 1 + 64.
 * In a bigger region, slots share queues modulo their number: a shared
 * queue's lock is still the producer lock of each of its rings, but its
 * peers then wait for each other's rings.
 */
#define IVL_TXQ_LOWER		0U
#define IVL_TXQ_PEER0		1U
#define IVL_DEF_TXQ		(IVL_TXQ_PEER0 + 16U)
#define IVL_MAX_TXQ		(IVL_TXQ_PEER0 + IVL_MAX_PEERS)

static inline u16 ivl_peer_qid(const struct ivl_priv *priv, u32 slot)
{
	return IVL_TXQ_PEER0 +
	       slot % (priv->dev->real_num_tx_queues - IVL_TXQ_PEER0);
}

static inline struct netdev_queue *ivl_peer_txq(const struct ivl_priv *priv,
						const struct ivl_peer *peer)
{
	return netdev_get_tx_queue(priv->dev, ivl_peer_qid(priv, peer->id));
}

/*
 * The peer after @p (NULL: the first) other than my own slot, or NULL.
 * Every "all the others" loop is
 *	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p))
 */
static inline struct ivl_peer *ivl_peer_next(const struct ivl_shm *shm,
					     const struct ivl_peer *p)
{
	u32 id = p ? p->id + 1 : 0;

	if (id == shm->my_slot)
		id++;
	return id < shm->max_peers ? &shm->peers[id] : NULL;
}

/* --- region geometry (offsets validated at probe) --- */

static inline struct ivl_slot *ivl_slot(const struct ivl_shm *shm, u32 id)
{
	return shm->region + IVL_HDR_SIZE + (size_t)id * IVL_SLOT_SIZE;
}

static inline void *ivl_ring_base(const struct ivl_shm *shm, u32 prod, u32 cons)
{
	u64 idx = (u64)prod * shm->max_peers + cons;

	return shm->region + shm->rings_offset + idx * shm->ring_stride;
}

/* QEMU peer IDs are 16 bits wide in the doorbell register. */
#define IVL_PEER_ID_MAX		0xffffU

/* @peer_id: a QEMU peer ID (not a slot), checked <= IVL_PEER_ID_MAX. */
static inline void ivl_doorbell(const struct ivl_shm *shm, u32 peer_id,
				u32 vec)
{
	writel((peer_id << 16) | vec, shm->regs + IVL_REG_DOORBELL);
}

/* @peer's queue lock is its ring's one producer lock (ndo_start_xmit holds it). */
#define ivl_assert_txq_held(priv, peer) \
	lockdep_assert_held(&ivl_peer_txq(priv, peer)->_xmit_lock)

static inline bool ivl_peer_usable_tx(const struct ivl_peer *peer)
{
	/* the flags switch a peer to the lower path before the table does */
	return !(READ_ONCE(peer->flags) &
		 (BIT(IVL_PEER_BROKEN) | BIT(IVL_PEER_STALLED)));
}

/* --- counters --- */

static inline void __ivl_stat_add(struct ivl_priv *priv, size_t off, u64 n)
{
	struct ivl_pcpu_stats *s = this_cpu_ptr(priv->stats);

	u64_stats_update_begin(&s->syncp);
	u64_stats_add((u64_stats_t *)((u8 *)&s->s + off), n);
	u64_stats_update_end(&s->syncp);
}

/* Callers have BH disabled (xmit, NAPI, rx_handler, soft timers). */
#define ivl_stat_add(priv, field, n) \
	__ivl_stat_add(priv, offsetof(struct ivl_stats, field), n)
#define ivl_stat_inc(priv, field) ivl_stat_add(priv, field, 1)

/* From process context. */
#define ivl_stat_add_bh(priv, field, n)		\
	do {					\
		local_bh_disable();		\
		ivl_stat_add(priv, field, n);	\
		local_bh_enable();		\
	} while (0)
#define ivl_stat_inc_bh(priv, field) ivl_stat_add_bh(priv, field, 1)

static inline void ivl_peer_stat_add(struct ivl_peer_stats *ps, u32 bytes)
{
	u64_stats_update_begin(&ps->syncp);
	u64_stats_inc(&ps->packets);
	u64_stats_add(&ps->bytes, bytes);
	u64_stats_update_end(&ps->syncp);
}

/* ivl_pci.c */
extern struct pci_driver ivl_pci_driver;

/*
 * Who calls whom: ivl_pci.c and ivl_netdev.c (control, rtnl) call down
 * into ivl_peer.c (the table), ivl_core.c and ivl_poll.c (the data path);
 * ivl_peer.c calls into ivl_core.c; ivl_core.c and ivl_poll.c call each
 * other, and nothing above them.  Each function below has its kernel-doc
 * where it is defined.
 */

/* ivl_netdev.c: ivl0, its link ops, the lower NIC's events */
extern struct rtnl_link_ops ivl_link_ops;
extern struct notifier_block ivl_netdev_notifier;
void ivl_pair_shm(struct ivl_shm *shm);
void ivl_attach(struct ivl_priv *priv, struct ivl_shm *shm);
void ivl_detach(struct ivl_priv *priv, u32 state);

/* ivl_ethtool.c: counters and ethtool */
extern const struct ethtool_ops ivl_ethtool_ops;
void ivl_get_stats64(struct net_device *dev, struct rtnl_link_stats64 *st);

/* ivl_core.c: the data path */
u16 ivl_select_queue(struct net_device *dev, struct sk_buff *skb,
		     struct net_device *sb_dev);
netdev_tx_t ivl_start_xmit(struct sk_buff *skb, struct net_device *dev);
rx_handler_result_t ivl_handle_frame(struct sk_buff **pskb);
void ivl_tx_wake_check(struct ivl_priv *priv, struct ivl_shm *shm);
enum hrtimer_restart ivl_tx_timer_fn(struct hrtimer *timer);
void ivl_tx_flow_reset(struct ivl_priv *priv, struct ivl_shm *shm);
void ivl_napi_schedule_rx(struct ivl_priv *priv, struct ivl_shm *shm,
			  bool only_busy);
bool ivl_rx_sync(struct ivl_priv *priv, struct ivl_shm *shm);
void ivl_rx_uninit(struct ivl_priv *priv, struct ivl_shm *shm);
void ivl_rx_drain(struct ivl_priv *priv, struct ivl_shm *shm);
void ivl_peer_broken(struct ivl_peer *peer, const char *why);
void ivl_peer_stalled(struct ivl_priv *priv, struct ivl_peer *peer,
		      const char *why);

/* ivl_poll.c */
int ivl_poll_init(struct ivl_priv *priv);
void ivl_poll_uninit(struct ivl_priv *priv);
void ivl_poll_tx(struct ivl_priv *priv);
void ivl_poll_rx(struct ivl_priv *priv);

/* ivl_peer.c */
void ivl_peers_init(struct ivl_shm *shm);
void ivl_peers_start(struct ivl_shm *shm, struct ivl_priv *priv);
void ivl_peers_stop(struct ivl_shm *shm);
void ivl_slot_publish(struct ivl_shm *shm, u32 state, const u8 *mac);
void ivl_notify_peers(struct ivl_shm *shm);
u32 ivl_peers_unacked(struct ivl_shm *shm);
void ivl_slot_read_nic(struct ivl_shm *shm);
void ivl_peers_debugfs_add(struct ivl_shm *shm);

#endif /* IVL_H */
