// SPDX-License-Identifier: GPL-2.0
/*
 * ivloop module glue: link type, netdev notifier, PCI driver, debugfs root.
 *
 *   ip link add link eth0 name ivl0 type ivloop
 */
#include <linux/debugfs.h>
#include <linux/module.h>

#include "ivl.h"

bool ivl_param_force_lower;
module_param_named(force_lower, ivl_param_force_lower, bool, 0444);
MODULE_PARM_DESC(force_lower,
		 "Initial value of the force-lower private flag (default: off)");

unsigned int ivl_param_stall_ms = IVL_HEARTBEAT_TIMEOUT_MS;
module_param_named(stall_ms, ivl_param_stall_ms, uint, 0444);
MODULE_PARM_DESC(stall_ms,
		 "A peer whose ring stays full this long is sent over the lower NIC (ms)");

unsigned int ivl_param_poll_us = 500;

static int ivl_param_poll_us_set(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_minmax(val, kp, 0, IVL_POLL_US_MAX);
}

static const struct kernel_param_ops ivl_param_poll_us_ops = {
	.set = ivl_param_poll_us_set,
	.get = param_get_uint,
};

/*
 * A default for new devices on uniprocessor guests (SMP guests start at
 * 0, see ivl_setup()); each device's own value is ethtool's rx-usecs.
 */
module_param_cb(poll_us, &ivl_param_poll_us_ops, &ivl_param_poll_us, 0444);
MODULE_PARM_DESC(poll_us,
		 "Default of ethtool rx-usecs on uniprocessor guests (SMP guests start at 0): longest time to poll the rings for the next shared-memory frame on an otherwise idle CPU, instead of waiting for a doorbell (us, 0: never, at most 10000)");

LIST_HEAD(ivl_uppers);
LIST_HEAD(ivl_shms);

struct dentry *ivl_debugfs_root;

static int __init ivl_init(void)
{
	int err;

	/* ERR_PTR-tolerant: debugfs is optional */
	ivl_debugfs_root = debugfs_create_dir(IVL_DRV_NAME, NULL);

	err = rtnl_link_register(&ivl_link_ops);
	if (err)
		goto remove_debugfs;

	err = register_netdevice_notifier(&ivl_netdev_notifier);
	if (err)
		goto unregister_link;

	err = pci_register_driver(&ivl_pci_driver);
	if (err)
		goto unregister_notifier;

	return 0;

unregister_notifier:
	unregister_netdevice_notifier(&ivl_netdev_notifier);
unregister_link:
	rtnl_link_unregister(&ivl_link_ops);
remove_debugfs:
	debugfs_remove(ivl_debugfs_root);
	return err;
}

static void __exit ivl_exit(void)
{
	/* the device first: its remove() detaches from ivl0 */
	pci_unregister_driver(&ivl_pci_driver);
	/* deletes ivl0 while the notifier still watches its lower device */
	rtnl_link_unregister(&ivl_link_ops);
	unregister_netdevice_notifier(&ivl_netdev_notifier);
	debugfs_remove(ivl_debugfs_root);
}

module_init(ivl_init);
module_exit(ivl_exit);

MODULE_DESCRIPTION("ivloop: shared-memory network path between co-resident VMs");
MODULE_AUTHOR("ivloop project");
MODULE_VERSION(IVL_DRV_VERSION);
MODULE_LICENSE("GPL");
MODULE_ALIAS_RTNL_LINK(IVL_LINK_KIND);
