// SPDX-License-Identifier: GPL-2.0
/*
 * rsdrv: an endpoint claims what its entry grants.
 *
 * Port and memory ranges are reserved in the kernel's resource trees
 * (request_region / request_mem_region, named "rsdrv:LABEL") when rsd adds
 * them to the entry, and a PCI device gets a driver_override no driver
 * matches.  So a kernel driver and a user-mode driver never both drive one
 * device: set-up fails with EBUSY if the kernel (or another endpoint)
 * holds the range or the device, and while the endpoint lives no kernel
 * driver can take it.  Everything is released with the endpoint.
 */
#include <linux/device.h>
#include <linux/ioport.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/string.h>
#include "rsdrv_compat.h"
#include "rsdrv_internal.h"

/* No PCI driver has this name, so a device with this override binds to none. */
#define RSDRV_OVERRIDE "rsdrv"

/* Serialises claims of PCI devices: the check and the override are one step. */
static DEFINE_MUTEX(rsdrv_pci_lock);

/* Caller holds ep->lock, the entry is unsealed and labelled, r is checked. */
int rsdrv_claim_io(struct rsdrv_ep *ep, const struct rsdrv_io_range *r)
{
	struct resource *res = request_region(r->base, r->count, ep->res_name);

	if (!res) {
		pr_warn_ratelimited("rsdrv: %s/%llu: io 0x%x-0x%x is busy (see /proc/ioports)\n",
				    ep->label, ep->gen, r->base, r->base + r->count - 1);
		return -EBUSY;
	}
	ep->io_res[ep->n_io] = res;
	return 0;
}

int rsdrv_claim_mem(struct rsdrv_ep *ep, const struct rsdrv_mem_range *r)
{
	struct resource *res = request_mem_region(r->phys, r->size, ep->res_name);

	if (!res) {
		pr_warn_ratelimited("rsdrv: %s/%llu: mem 0x%llx-0x%llx is busy (see /proc/iomem)\n",
				    ep->label, ep->gen, r->phys, r->phys + r->size - 1);
		return -EBUSY;
	}
	ep->mem_res[ep->n_mem] = res;
	return 0;
}

/* Caller holds ep->lock; on success the endpoint owns pdev and its claim. */
int rsdrv_claim_pci(struct rsdrv_ep *ep, struct pci_dev *pdev)
{
	struct device *dev = &pdev->dev;
	char *saved = NULL;
	char bound[32] = "";
	int ret = 0;

	mutex_lock(&rsdrv_pci_lock);
	ret = rsdrv_override_is(pdev, RSDRV_OVERRIDE, &saved);
	if (ret > 0)
		ret = -EBUSY;			/* another endpoint holds it */
	if (ret)
		goto out;
	/*
	 * Bar every driver first, then look: a probe in progress holds the
	 * device lock and PCI's probe checks the override again under it, so
	 * after this either a driver is bound or none can be.
	 */
	ret = rsdrv_override_set(pdev, RSDRV_OVERRIDE);
	if (ret)
		goto out;
	device_lock(dev);
	if (dev->driver) {
		strscpy(bound, dev->driver->name, sizeof(bound));
		ret = -EBUSY;
	}
	device_unlock(dev);
	if (ret) {
		rsdrv_override_set(pdev, saved);
		pr_warn_ratelimited("rsdrv: %s/%llu: pci %s is bound to kernel driver %s\n",
				    ep->label, ep->gen, pci_name(pdev), bound);
		goto out;
	}
	ep->pci_saved_override = saved;
	saved = NULL;
out:
	mutex_unlock(&rsdrv_pci_lock);
	if (ret == -EBUSY && !bound[0])
		pr_warn_ratelimited("rsdrv: %s/%llu: pci %s is held by another rsdrv endpoint\n",
				    ep->label, ep->gen, pci_name(pdev));
	kfree(saved);
	return ret;
}

/* The endpoint is unlisted and nothing can use it any more. */
void rsdrv_claims_release(struct rsdrv_ep *ep)
{
	unsigned int i;

	for (i = 0; i < ep->n_io; i++)
		if (ep->io_res[i])
			release_region(ep->io[i].base, ep->io[i].count);
	for (i = 0; i < ep->n_mem; i++)
		if (ep->mem_res[i])
			release_mem_region(ep->mem[i].phys, ep->mem[i].size);
	if (ep->pdev) {
		mutex_lock(&rsdrv_pci_lock);
		/* Root may have changed it meanwhile; then its value stays. */
		if (rsdrv_override_is(ep->pdev, RSDRV_OVERRIDE, NULL) > 0)
			rsdrv_override_set(ep->pdev, ep->pci_saved_override);
		mutex_unlock(&rsdrv_pci_lock);
		kfree(ep->pci_saved_override);
		ep->pci_saved_override = NULL;
	}
}
