// SPDX-License-Identifier: GPL-2.0
/*
 * ivloop counters and ethtool: `ethtool -S ivl0` (per-CPU counters that
 * only go up), the force-lower private flag, rx-usecs (the ring poller's
 * longest window), link settings from the lower NIC.
 */
#include <linux/ethtool.h>

#include "ivl.h"

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
	IVL_STAT(peer_rx_made),
	IVL_STAT(peer_rx_freed),
	IVL_STAT(poll_windows),
	IVL_STAT(poll_hits),
	IVL_STAT(poll_starved),
	IVL_STAT(poll_watchdog),
	IVL_STAT(poll_stolen),
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

/**
 * ivl_get_stats64() - ndo_get_stats64: both paths' counters summed
 * @dev: ivl0
 * @st: filled in
 *
 * Context: any (the per-CPU counters are read under u64_stats_sync).
 */
void ivl_get_stats64(struct net_device *dev, struct rtnl_link_stats64 *st)
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

const struct ethtool_ops ivl_ethtool_ops = {
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
