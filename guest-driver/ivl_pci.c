// SPDX-License-Identifier: GPL-2.0
/*
 * ivloop PCI side: QEMU's ivshmem-doorbell device (1af4:1110).
 *
 * BAR0: registers (IVPosition, Doorbell).  BAR1: MSI-X.  BAR2: the shared
 * region, which is RAM on the host, so it is mapped write-back with
 * memremap() rather than as I/O memory.  Two MSI-X vectors: membership
 * (the directory changed) and data (a ring has records or room).
 */
#include <linux/debugfs.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/log2.h>
#include <linux/module.h>

#include "ivl.h"

#define IVL_PCI_VENDOR		0x1af4	/* Red Hat, Inc. (Qumranet) */
#define IVL_PCI_DEVICE		0x1110	/* Inter-VM shared memory */
#define IVL_BAR_REGS		0
#define IVL_BAR_REGION		2
#define IVL_REGS_SIZE		0x100
/* Looking for my slot at probe: this many rereads, this far apart at most. */
#define IVL_SLOT_TRIES		10U
#define IVL_SLOT_WAIT_MS	100U

static irqreturn_t ivl_membership_irq(int irq, void *data)
{
	struct ivl_shm *shm = data;

	/* a probe looking for its slot waits for this */
	complete(&shm->dir_changed);
	/* the work rereads the directory; it does nothing while unpaired */
	queue_work(system_wq, &shm->refresh_work);
	return IRQ_HANDLED;
}

static irqreturn_t ivl_data_irq(int irq, void *data)
{
	struct ivl_shm *shm = data;
	struct ivl_priv *priv = READ_ONCE(shm->priv);

	/*
	 * NAPI reads the rings and wakes a queue stopped on a full one.  The
	 * vector does not say who rang: every peer with work gets its poll.
	 */
	if (priv)
		ivl_napi_schedule_rx(priv, shm, true);
	return IRQ_HANDLED;
}

/*
 * Check the header the server wrote.  Every field is read once into a
 * local; only checked locals reach @shm.
 */
static int ivl_region_validate(struct ivl_shm *shm, u64 bar_len)
{
	const struct ivl_region_hdr *hdr = shm->region;
	struct device *dev = &shm->pdev->dev;
	u32 magic, version, max_peers, ring_size, dir_offset, slot_size;
	u64 region_size, rings_offset, ring_stride, rings_end;
	u32 my_peer_id;

	magic = le32_to_cpu(READ_ONCE(hdr->magic));
	version = le32_to_cpu(READ_ONCE(hdr->version));
	region_size = le64_to_cpu(READ_ONCE(hdr->region_size));
	max_peers = le32_to_cpu(READ_ONCE(hdr->max_peers));
	ring_size = le32_to_cpu(READ_ONCE(hdr->ring_size));
	dir_offset = le32_to_cpu(READ_ONCE(hdr->dir_offset));
	slot_size = le32_to_cpu(READ_ONCE(hdr->slot_size));
	rings_offset = le64_to_cpu(READ_ONCE(hdr->rings_offset));
	ring_stride = le64_to_cpu(READ_ONCE(hdr->ring_stride));
	my_peer_id = readl(shm->regs + IVL_REG_IVPOSITION);

	if (magic != IVL_MAGIC) {
		dev_err(dev, "region magic %#x, expected %#x: no ivloop-server behind this device?\n",
			magic, IVL_MAGIC);
		return -ENODEV;
	}
	if (version != IVL_ABI_VERSION) {
		dev_err(dev, "region ABI version %u, this driver speaks %u\n",
			version, IVL_ABI_VERSION);
		return -EPROTO;
	}
	if (region_size > bar_len || region_size < IVL_HDR_SIZE ||
	    !is_power_of_2(region_size)) {
		dev_err(dev, "region size %llu does not fit BAR2 of %llu bytes\n",
			region_size, bar_len);
		return -EINVAL;
	}
	if (!max_peers || max_peers > IVL_MAX_PEERS) {
		dev_err(dev, "max_peers %u outside 1..%u\n",
			max_peers, IVL_MAX_PEERS);
		return -EINVAL;
	}
	if (!is_power_of_2(ring_size) || ring_size < IVL_RING_MIN_SIZE ||
	    ring_size > IVL_RING_MAX_SIZE) {
		dev_err(dev, "ring size %u is not a power of two in %u..%u\n",
			ring_size, IVL_RING_MIN_SIZE, IVL_RING_MAX_SIZE);
		return -EINVAL;
	}
	if (dir_offset != IVL_HDR_SIZE || slot_size != IVL_SLOT_SIZE ||
	    ring_stride != (u64)IVL_RING_CTRL_SIZE + ring_size) {
		dev_err(dev, "layout mismatch: dir_offset %u slot_size %u ring_stride %llu\n",
			dir_offset, slot_size, ring_stride);
		return -EINVAL;
	}
	/* max_peers <= 64 and ring_stride < 2^27: no overflow in u64 */
	rings_end = rings_offset + (u64)max_peers * max_peers * ring_stride;
	if (!IS_ALIGNED(rings_offset, IVL_HDR_SIZE) ||
	    rings_offset < (u64)dir_offset + max_peers * slot_size ||
	    rings_offset > region_size || rings_end > region_size) {
		dev_err(dev, "rings at %llu..%llu do not fit the %llu-byte region\n",
			rings_offset, rings_end, region_size);
		return -EINVAL;
	}
	/* QEMU's peer ID, not a slot: any value the doorbell can address */
	if (my_peer_id > IVL_PEER_ID_MAX) {
		dev_err(dev, "IVPosition %d outside 0..%u: no server connection?\n",
			(s32)my_peer_id, IVL_PEER_ID_MAX);
		return -EINVAL;
	}

	shm->region_size = region_size;
	shm->max_peers = max_peers;
	shm->ring_size = ring_size;
	shm->rings_offset = rings_offset;
	shm->ring_stride = ring_stride;
	shm->my_peer_id = my_peer_id;
	return 0;
}

/*
 * My slot: the one present slot whose peer_id is my IVPosition.  Each
 * field is read once; stale peer_ids of absent slots do not count.
 * Returns the slot, -ENOENT when there is none, -EEXIST when several
 * claim my ID.
 */
static int ivl_find_my_slot(struct ivl_shm *shm)
{
	const struct ivl_slot *slot;
	int found = -ENOENT;
	u32 id, present, peer_id;

	for (id = 0; id < shm->max_peers; id++) {
		slot = ivl_slot(shm, id);
		present = le32_to_cpu(READ_ONCE(slot->present));
		peer_id = le32_to_cpu(READ_ONCE(slot->peer_id));
		if (present != 1 || peer_id != shm->my_peer_id)
			continue;
		if (found >= 0)
			return -EEXIST;
		found = id;
	}
	return found;
}

/*
 * The server writes our slot before QEMU learns its peer ID, so it is
 * normally there at once.  Otherwise look again after each membership
 * doorbell (or a short timeout), a few times, and then give up.
 */
static int ivl_claim_slot(struct ivl_shm *shm)
{
	unsigned int tries;
	int slot;

	for (tries = 0; ; tries++) {
		reinit_completion(&shm->dir_changed);
		slot = ivl_find_my_slot(shm);
		if (slot >= 0) {
			shm->my_slot = slot;
			return 0;
		}
		if (tries == IVL_SLOT_TRIES)
			break;
		wait_for_completion_timeout(&shm->dir_changed,
					    msecs_to_jiffies(IVL_SLOT_WAIT_MS));
	}
	dev_err(&shm->pdev->dev, "%s directory slot holds my IVPosition %u (of %u slots): refusing the device\n",
		slot == -EEXIST ? "more than one" : "no",
		shm->my_peer_id, shm->max_peers);
	return slot == -EEXIST ? -EEXIST : -ENODEV;
}

static int ivl_pci_map(struct ivl_shm *shm)
{
	struct pci_dev *pdev = shm->pdev;
	resource_size_t start = pci_resource_start(pdev, IVL_BAR_REGION);
	resource_size_t len = pci_resource_len(pdev, IVL_BAR_REGION);
	int err;

	if (pci_resource_len(pdev, IVL_BAR_REGS) < IVL_REGS_SIZE ||
	    len < IVL_HDR_SIZE) {
		dev_err(&pdev->dev, "BAR0 or BAR2 missing or too small\n");
		return -ENODEV;
	}
	shm->regs = pci_iomap(pdev, IVL_BAR_REGS, IVL_REGS_SIZE);
	if (!shm->regs)
		return -ENOMEM;
	/* the region is host RAM shared with other guests, not registers */
	shm->region = memremap(start, len, MEMREMAP_WB);
	if (!shm->region) {
		err = -ENOMEM;
		goto unmap_regs;
	}
	err = ivl_region_validate(shm, len);
	if (err)
		goto unmap_region;
	return 0;

unmap_region:
	memunmap(shm->region);
unmap_regs:
	pci_iounmap(pdev, shm->regs);
	return err;
}

static void ivl_pci_unmap(struct ivl_shm *shm)
{
	memunmap(shm->region);
	pci_iounmap(shm->pdev, shm->regs);
}

static int ivl_pci_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct ivl_shm *shm;
	int err;

	shm = kzalloc(sizeof(*shm), GFP_KERNEL);
	if (!shm)
		return -ENOMEM;
	shm->pdev = pdev;
	pci_set_drvdata(pdev, shm);

	err = pci_enable_device(pdev);
	if (err)
		goto free_shm;
	err = pci_request_regions(pdev, IVL_DRV_NAME);
	if (err)
		goto disable_device;
	err = ivl_pci_map(shm);
	if (err)
		goto release_regions;

	shm->peers = kcalloc(shm->max_peers, sizeof(*shm->peers), GFP_KERNEL);
	if (!shm->peers) {
		err = -ENOMEM;
		goto unmap;
	}
	ivl_peers_init(shm);
	init_completion(&shm->dir_changed);

	/* MSI-X messages are memory writes by the device: needs bus master */
	pci_set_master(pdev);
	err = pci_alloc_irq_vectors(pdev, IVL_NR_VECTORS, IVL_NR_VECTORS,
				    PCI_IRQ_MSIX);
	if (err < 0) {
		dev_err(&pdev->dev, "need %u MSI-X vectors (ivshmem-doorbell with vectors=%u): %d\n",
			IVL_NR_VECTORS, IVL_NR_VECTORS, err);
		goto free_peers;
	}
	err = pci_request_irq(pdev, IVL_VEC_MEMBERSHIP, ivl_membership_irq,
			      NULL, shm, "%s-membership", IVL_DRV_NAME);
	if (err)
		goto free_vectors;
	err = pci_request_irq(pdev, IVL_VEC_DATA, ivl_data_irq, NULL, shm,
			      "%s-data", IVL_DRV_NAME);
	if (err)
		goto free_membership_irq;

	err = ivl_claim_slot(shm);
	if (err)
		goto free_data_irq;
	/* a previous guest in this slot may have left UP behind */
	ivl_slot_publish(shm, IVL_STATE_DOWN, NULL);
	ivl_slot_read_nic(shm);

	dev_info(&pdev->dev, "ivloop region %llu MiB, slot %u of %u, peer id %u, rings %u KiB\n",
		 shm->region_size >> 20, shm->my_slot, shm->max_peers,
		 shm->my_peer_id, shm->ring_size >> 10);
	if (shm->nic_mac_known)
		dev_info(&pdev->dev, "the server knows our data NIC as %pM\n",
			 shm->nic_mac);
	else
		dev_info(&pdev->dev, "the server does not know our data NIC: pairing with any ivloop link\n");
	rtnl_lock();
	list_add_tail(&shm->node, &ivl_shms);
	ivl_peers_debugfs_add(shm);
	ivl_pair_shm(shm);
	rtnl_unlock();
	return 0;

free_data_irq:
	pci_free_irq(pdev, IVL_VEC_DATA, shm);
free_membership_irq:
	pci_free_irq(pdev, IVL_VEC_MEMBERSHIP, shm);
free_vectors:
	pci_free_irq_vectors(pdev);
	/* an IRQ may have queued the work before it was freed */
	cancel_work_sync(&shm->refresh_work);
free_peers:
	pci_clear_master(pdev);
	kfree(shm->peers);
unmap:
	ivl_pci_unmap(shm);
release_regions:
	pci_release_regions(pdev);
disable_device:
	pci_disable_device(pdev);
free_shm:
	kfree(shm);
	return err;
}

/*
 * Hot-unplug (device_del) and rmmod.  Peers hear LEAVING and switch us to
 * their lower path; we switch them to ours, drain our rings and let go.
 *
 * Host-side caveat, not a driver issue: QEMU 7.2's ivshmem_exit() closes
 * the vector eventfds but, without irqfd (TCG), leaves their fd handlers
 * registered.  A device plugged again into the same QEMU process can get
 * those fd numbers for new eventfds, and the first doorbell on one runs
 * the stale handler on freed memory (QEMU dies with a GPF).  A fresh QEMU
 * (the migration destination) is not affected.
 */
static void ivl_pci_remove(struct pci_dev *pdev)
{
	struct ivl_shm *shm = pci_get_drvdata(pdev);

	rtnl_lock();
	if (shm->upper) {
		ivl_detach(shm->upper, IVL_STATE_LEAVING);
	} else {
		ivl_slot_publish(shm, IVL_STATE_LEAVING, NULL);
		ivl_notify_peers(shm);
	}
	list_del(&shm->node);
	rtnl_unlock();

	debugfs_remove(shm->dbg_dir);
	pci_free_irq(pdev, IVL_VEC_DATA, shm);
	pci_free_irq(pdev, IVL_VEC_MEMBERSHIP, shm);
	pci_free_irq_vectors(pdev);
	/* the membership IRQ may have queued it; it found no priv */
	cancel_work_sync(&shm->refresh_work);
	pci_clear_master(pdev);
	kfree(shm->peers);
	ivl_pci_unmap(shm);
	pci_release_regions(pdev);
	pci_disable_device(pdev);
	kfree(shm);
}

/* Reboot or poweroff: let peers know at once instead of by timeout. */
static void ivl_pci_shutdown(struct pci_dev *pdev)
{
	struct ivl_shm *shm = pci_get_drvdata(pdev);

	ivl_slot_publish(shm, IVL_STATE_LEAVING, NULL);
	ivl_notify_peers(shm);
}

static const struct pci_device_id ivl_pci_ids[] = {
	{ PCI_DEVICE(IVL_PCI_VENDOR, IVL_PCI_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, ivl_pci_ids);

struct pci_driver ivl_pci_driver = {
	.name		= IVL_DRV_NAME,
	.id_table	= ivl_pci_ids,
	.probe		= ivl_pci_probe,
	.remove		= ivl_pci_remove,
	.shutdown	= ivl_pci_shutdown,
};
