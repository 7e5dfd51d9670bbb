/* SPDX-License-Identifier: GPL-2.0 */
/*
 * rsdrv: the kernel APIs that differ between the kernels rsdrv supports
 * (Debian 12's 6.1 and 6.12), each behind one small helper, so the rest of
 * the module reads the same on both.  Every version check of the module is
 * in this file (and the one feature test in Kbuild).
 */
#ifndef RSDRV_COMPAT_H
#define RSDRV_COMPAT_H

#include <linux/device.h>
#include <linux/eventfd.h>
#include <linux/mm.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/version.h>

/* 6.3 made vma->vm_flags read-only: writers go through vm_flags_set(). */
static inline void rsdrv_vm_flags_set(struct vm_area_struct *vma, vm_flags_t flags)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, flags);
#else
	vma->vm_flags |= flags;
#endif
}

/* 6.5 dropped pin_user_pages_remote()'s vmas argument (rsdrv never used it). */
static inline long rsdrv_pin_user_pages_remote(struct mm_struct *mm, unsigned long start,
					       unsigned long nr_pages, unsigned int gup_flags,
					       struct page **pages, int *locked)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0)
	return pin_user_pages_remote(mm, start, nr_pages, gup_flags, pages, locked);
#else
	return pin_user_pages_remote(mm, start, nr_pages, gup_flags, pages, NULL, locked);
#endif
}

/* 6.8's eventfd_signal() always adds 1: the count argument went. */
static inline void rsdrv_eventfd_signal(struct eventfd_ctx *ctx)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
	eventfd_signal(ctx);
#else
	eventfd_signal(ctx, 1);
#endif
}

/*
 * A PCI device's driver_override.  The driver core took it over from struct
 * pci_dev (struct device's own, under its own spinlock, set with
 * device_set_driver_override()); stable kernels got that by backport
 * (Debian's 6.12.117 has it, 6.1.192 does not), so Kbuild tests the header
 * and defines RSDRV_HAVE_DEVICE_DRIVER_OVERRIDE rather than trusting a
 * version number.  Before, the field was pci_dev's, under the device lock.
 */

/* Set it (NULL clears it). */
static inline int rsdrv_override_set(struct pci_dev *pdev, const char *value)
{
#ifdef RSDRV_HAVE_DEVICE_DRIVER_OVERRIDE
	return device_set_driver_override(&pdev->dev, value ?: "");
#else
	return driver_set_override(&pdev->dev, &pdev->driver_override, value ?: "",
				   value ? strlen(value) : 0);
#endif
}

/*
 * Whether it is `name`; if not and `copy` is given, a kmalloc'd copy of the
 * current value goes there (NULL if none is set; -ENOMEM if it cannot be
 * copied).  One look, so the answer and the copy agree.
 */
static inline int rsdrv_override_is(struct pci_dev *pdev, const char *name, char **copy)
{
	const char *cur;
	int ret = 0;

#ifdef RSDRV_HAVE_DEVICE_DRIVER_OVERRIDE
	spin_lock(&pdev->dev.driver_override.lock);
	cur = pdev->dev.driver_override.name;
#else
	device_lock(&pdev->dev);
	cur = pdev->driver_override;
#endif
	if (cur && !strcmp(cur, name))
		ret = 1;
	else if (copy && cur && !(*copy = kstrdup(cur, GFP_ATOMIC)))
		ret = -ENOMEM;		/* GFP_ATOMIC: under a spinlock on new kernels */
#ifdef RSDRV_HAVE_DEVICE_DRIVER_OVERRIDE
	spin_unlock(&pdev->dev.driver_override.lock);
#else
	device_unlock(&pdev->dev);
#endif
	return ret;
}

#endif
