// SPDX-License-Identifier: GPL-2.0
/*
 * ivloop control path: the upper device ivl0 stacked on the guest's NIC.
 *
 * Pairing with the PCI device (the shared region), net_device_ops,
 * rtnl_link_ops ("ip link add link eth0 name ivl0 type ivloop"), and
 * following the lower NIC (MTU, MAC, carrier, announces, VLAN IDs).
 * Everything here runs under rtnl.  The data path is ivl_core.c.
 */
#include <linux/if_arp.h>
#include <linux/if_vlan.h>

#include "ivl.h"

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

/* ------------------------------------------------------------------ */
/* pairing with the PCI device (rtnl)                                 */

static void ivl_napi_enable(struct ivl_priv *priv, struct ivl_shm *shm,
			    bool on)
{
	struct ivl_peer *p;

	ASSERT_RTNL();
	if (priv->napi_on == on)
		return;
	/* ivl_rx_sync() adds and deletes NAPIs under rtnl too */
	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		if (!p->rx_ready)
			continue;
		if (on)
			napi_enable(&p->napi);
		else
			napi_disable(&p->napi);
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

/*
 * rtnl.  Does @shm belong under @priv?  The server tells which of the
 * guest's NICs is the data NIC; when it could not, any free upper will do.
 */
static bool ivl_pair_match(const struct ivl_priv *priv,
			   const struct ivl_shm *shm)
{
	ASSERT_RTNL();
	if (shm->upper || ivl_shm_rtnl(priv))
		return false;
	return !shm->nic_mac_known ||
	       ether_addr_equal(priv->lower->dev_addr, shm->nic_mac);
}

/**
 * ivl_pair_shm() - give a new PCI device to the ivl0 it belongs under
 * @shm: the device, probed and in ivl_shms
 *
 * The upper stacked on the NIC whose MAC the server saw for this QEMU, or
 * any free upper when the server could not tell.  With none yet, the
 * device waits: ivl_newlink() pairs it when the link is created.
 *
 * Context: rtnl.
 */
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

/**
 * ivl_attach() - start using @shm's region under @priv
 * @priv: ivl0, not paired yet
 * @shm: the device, not paired yet
 *
 * Starts the peer table's refresh (which gives each peer that comes up
 * its receive state) and, when ivl0 is up, publishes our slot UP.
 *
 * Context: rtnl.
 */
void ivl_attach(struct ivl_priv *priv, struct ivl_shm *shm)
{
	ASSERT_RTNL();
	/* after a migration the device joins before virtio-net announces us */
	ivl_vlan_resync(priv);
	shm->upper = priv;
	rcu_assign_pointer(priv->shm, shm);
	ivl_peers_start(shm, priv);
	if (netif_running(priv->dev))
		ivl_shm_up(priv, shm);
	netdev_info(priv->dev, "shared memory %s attached: slot %u of %u, peer id %u, rings of %u KiB\n",
		    pci_name(shm->pdev), shm->my_slot, shm->max_peers,
		    shm->my_peer_id,
		    shm->ring_size / 1024);
}

/* Records still in the rings to us when we let go: counted, not read. */
static void ivl_rx_count_lost(struct ivl_priv *priv, struct ivl_shm *shm)
{
	u32 cap = shm->ring_size / IVL_REC_ALIGN;
	struct ivl_peer *p;
	struct ivl_rec rec;
	u32 n, lost = 0;

	for (p = ivl_peer_next(shm, NULL); p; p = ivl_peer_next(shm, p)) {
		if (!p->attached || !p->rx_on ||
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

/**
 * ivl_leave_handshake() - leave for good without losing a frame
 * @priv: ivl0
 * @shm: its device (going away), its NAPIs disabled, slot LEAVING
 *
 * Every UP peer acknowledges in its slot that it stopped sending to us
 * (ivl_leave_ack_publish()), and we drain until all have, or
 * IVL_LEAVE_ACK_MS passed.  What was sent before an ack is read by the
 * last drain; with every ack in, nothing can arrive after it.  What is
 * still there is counted (rx_leave_lost), and so are peers that never
 * answered (leave_ack_timeouts).
 *
 * Context: process; sleeps.
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

/**
 * ivl_detach() - stop using the region: peers first, then us
 * @priv: ivl0, paired with a device
 * @state: IVL_STATE_LEAVING when the device goes away (the leave
 *         handshake drains the rings), IVL_STATE_DOWN when ivl0 does
 *
 * Afterwards no frame, timer, work or IRQ of ours uses the rings or @priv
 * through the device.
 *
 * Context: rtnl; sleeps (grace periods, the handshake's up to
 * IVL_LEAVE_ACK_MS).
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
	ivl_rx_uninit(priv, shm);
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

	ASSERT_RTNL();
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
