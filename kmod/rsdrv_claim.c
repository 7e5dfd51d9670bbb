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
 *
 * One exception to "busy means refused": the legacy PC placeholders that x86
 * registers at boot for devices whose kernel driver reserves nothing
 * (rsdrv_legacy_placeholders below).  A range that collides only with those
 * is granted: the placeholders leave the port tree while the endpoint holds
 * the range and are put back when it lets go.
 */
#include <linux/device.h>
#include <linux/interrupt.h>
#include <linux/ioport.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/string.h>
#include "rsdrv_compat.h"
#include "rsdrv_internal.h"

/* The one driver a claimed device may be bound to (see rsdrv_claim_pci). */
#define RSDRV_UIO_DRIVER "uio_pci_generic"

/* No PCI driver has this name, so a device with this override binds to none. */
#define RSDRV_OVERRIDE "rsdrv"

/* Serialises claims of PCI devices: the check and the override are one step. */
static DEFINE_MUTEX(rsdrv_pci_lock);

/*
 * The busy resources arch/x86/kernel/setup.c (standard_io_resources) puts in
 * the port tree at boot that no driver stands behind: the i8042's data and
 * command/status ports, "keyboard" 0x60 and 0x64.  The kernel's i8042 driver
 * does not reserve them on x86 (it relies on these), so the placeholder is all
 * that shows in /proc/ioports; while that driver drives the keyboard or the
 * aux port it holds IRQ 1 or 12, so a placeholder is taken only while neither
 * line has a handler (boot with i8042.nokbd i8042.noaux).  The list's other
 * entries (dma1, pic1, timer0, timer1, dma page reg, pic2, dma2, fpu) stand
 * for the kernel's own PIC, PIT, DMA and FPU code and are never taken.
 */
static const struct rsdrv_legacy_placeholder {
	const char *name;
	u32 port;
	unsigned int driver_irqs[2];	/* held by the kernel's driver while it drives the device */
} rsdrv_legacy_placeholders[] = {
	{ "keyboard", 0x60, { 1, 12 } },
	{ "keyboard", 0x64, { 1, 12 } },
};

/* Serialises taking and giving back placeholders (and the look before). */
static DEFINE_MUTEX(rsdrv_placeholder_lock);

/*
 * The entry of rsdrv_legacy_placeholders that r is, or NULL.  Exact name,
 * port and flags, a leaf, and a static object of the kernel image: every
 * request_region() allocates its resource, so a driver's reservation of the
 * same port under the same name is never mistaken for the placeholder.
 */
static const struct rsdrv_legacy_placeholder *rsdrv_placeholder_of(const struct resource *r)
{
	unsigned long addr = (unsigned long)r;
	unsigned int i;

	if (r->flags != (IORESOURCE_IO | IORESOURCE_BUSY) || r->start != r->end || r->child || !r->name)
		return NULL;
	if (addr < __START_KERNEL_map || addr - __START_KERNEL_map >= KERNEL_IMAGE_SIZE)
		return NULL;
	for (i = 0; i < ARRAY_SIZE(rsdrv_legacy_placeholders); i++)
		if (r->start == rsdrv_legacy_placeholders[i].port &&
		    !strcmp(r->name, rsdrv_legacy_placeholders[i].name))
			return &rsdrv_legacy_placeholders[i];
	return NULL;
}

/*
 * Collect the placeholders overlapping [first, last] below parent into found
 * (at most max); the count, or -ENOSPC.  The resource tree's lock is not
 * exported to modules: this reads only the branch over the requested ports,
 * whose low legacy entries the kernel never frees, and remove_resource()
 * checks again under the lock that each one is still in the tree.
 */
static int rsdrv_find_placeholders(struct resource *parent, u32 first, u32 last,
				   struct resource **found, int n, int max)
{
	struct resource *c;

	for (c = parent->child; c && c->start <= last; c = c->sibling) {
		if (c->end < first)
			continue;
		if (rsdrv_placeholder_of(c)) {
			if (n == max)
				return -ENOSPC;
			found[n++] = c;
		} else if (c->child) {
			n = rsdrv_find_placeholders(c, first, last, found, n, max);
			if (n < 0)
				return n;
		}
	}
	return n;
}

static void rsdrv_put_back_placeholders(struct rsdrv_ep *ep, struct resource **taken, unsigned int n,
					bool announce)
{
	unsigned int i;

	for (i = 0; i < n; i++) {
		/* insert_resource() finds the window it belongs under again. */
		if (insert_resource(&ioport_resource, taken[i]))
			pr_warn("rsdrv: %s/%llu: could not put back the legacy placeholder %pR \"%s\" (its ports are reserved again)\n",
				ep->label, ep->gen, taken[i], taken[i]->name);
		else if (announce)
			pr_info("rsdrv: %s/%llu: put back the legacy placeholder %pR \"%s\"\n",
				ep->label, ep->gen, taken[i], taken[i]->name);
	}
}

/*
 * request_region() failed for r: if what it collided with is only legacy
 * placeholders, take them out, reserve r and remember them; else NULL.
 */
static struct resource *rsdrv_claim_io_over_placeholders(struct rsdrv_ep *ep,
							 const struct rsdrv_io_range *r)
{
	u32 first = r->base, last = r->base + r->count - 1;
	unsigned int room = RSDRV_MAX_PLACEHOLDERS - ep->n_placeholders;
	struct resource *found[RSDRV_MAX_PLACEHOLDERS], *res = NULL;
	int n, i, j;

	mutex_lock(&rsdrv_placeholder_lock);
	n = rsdrv_find_placeholders(&ioport_resource, first, last, found, 0, room);
	if (n <= 0)
		goto out;
	for (i = 0; i < n; i++) {
		const struct rsdrv_legacy_placeholder *p = rsdrv_placeholder_of(found[i]);

		for (j = 0; j < ARRAY_SIZE(p->driver_irqs); j++) {
			if (irq_has_action(p->driver_irqs[j])) {
				pr_warn_ratelimited("rsdrv: %s/%llu: io 0x%x-0x%x: placeholder %pR \"%s\" not taken, IRQ %u has a handler (the kernel's driver for it?)\n",
						    ep->label, ep->gen, first, last, found[i],
						    found[i]->name, p->driver_irqs[j]);
				goto out;
			}
		}
	}
	for (i = 0; i < n; i++) {
		if (!found[i]->parent || remove_resource(found[i]))
			break;
	}
	if (i == n)
		res = request_region(r->base, r->count, ep->res_name);
	if (!res) {
		/* Something else holds part of r too (or a placeholder went meanwhile). */
		rsdrv_put_back_placeholders(ep, found, i, false);
		goto out;
	}
	for (i = 0; i < n; i++) {
		pr_info("rsdrv: %s/%llu: io 0x%x-0x%x: took the unowned legacy placeholder %pR \"%s\" out of the port tree\n",
			ep->label, ep->gen, first, last, found[i], found[i]->name);
		ep->placeholders[ep->n_placeholders++] = found[i];
	}
out:
	mutex_unlock(&rsdrv_placeholder_lock);
	return res;
}

/* Caller holds ep->lock, the entry is unsealed and labelled, r is checked. */
int rsdrv_claim_io(struct rsdrv_ep *ep, const struct rsdrv_io_range *r)
{
	struct resource *res = request_region(r->base, r->count, ep->res_name);

	if (!res)
		res = rsdrv_claim_io_over_placeholders(ep, r);
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
	/*
	 * uio_pci_generic (what rsd binds on a machine without an IOMMU) only
	 * forwards INTx and does no DMA of its own: the endpoint's buffers stay
	 * the device's only DMA memory.
	 */
	if (dev->driver && strcmp(dev->driver->name, RSDRV_UIO_DRIVER)) {
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
	if (ep->n_placeholders) {
		/* After the ranges: a placeholder put back over our reservation would adopt it. */
		mutex_lock(&rsdrv_placeholder_lock);
		rsdrv_put_back_placeholders(ep, ep->placeholders, ep->n_placeholders, true);
		ep->n_placeholders = 0;
		mutex_unlock(&rsdrv_placeholder_lock);
	}
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
