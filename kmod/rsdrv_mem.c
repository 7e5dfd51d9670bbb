// SPDX-License-Identifier: GPL-2.0
/*
 * rsdrv: memory a driver may map.
 *  - physical ranges in the entry (device memory such as VGA text memory),
 *    mapped uncached; rsdrv refuses to put system RAM in an entry at all;
 *  - coherent DMA buffers for the entry's PCI device.  Without an IOMMU the
 *    device can reach any memory, so such endpoints are reported as "DMA
 *    not isolated".  Buffers live until the file is released; a mapping
 *    holds a file reference, so none is freed while mapped.
 */
#include <linux/dma-mapping.h>
#include <linux/fs.h>
#include <linux/mm.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include "rsdrv_compat.h"
#include "rsdrv_internal.h"

/*
 * Device memory and DMA buffers are the driver's, not its children's: a
 * forked child gets neither (VM_DONTCOPY; VM_IO makes madvise(MADV_DOFORK)
 * fail, whichever way the DMA layer maps the buffer), and no mapping grows
 * past what was checked (VM_DONTEXPAND refuses mremap growth).
 */
#define RSDRV_VM_FLAGS (VM_DONTCOPY | VM_DONTEXPAND | VM_DONTDUMP | VM_IO)

static bool rsdrv_mem_allowed(const struct rsdrv_ep *ep, u64 phys, u64 size)
{
	unsigned int i;

	for (i = 0; i < ep->n_mem; i++) {
		const struct rsdrv_mem_range *r = &ep->mem[i];

		if (phys >= r->phys && size <= r->size && phys - r->phys <= r->size - size)
			return true;
	}
	return false;
}

static int rsdrv_dma_mmap(struct rsdrv_ep *ep, struct vm_area_struct *vma,
			  u64 off, u64 size)
{
	struct rsdrv_dma_buf *buf;
	u64 rel = off - RSDRV_DMA_MMAP_BASE;
	u64 id = rel / RSDRV_DMA_MMAP_STRIDE;
	int ret = -EINVAL;

	if (rel % RSDRV_DMA_MMAP_STRIDE)
		return -EINVAL;
	mutex_lock(&ep->lock);
	list_for_each_entry(buf, &ep->dma_bufs, node) {
		if (buf->id != id)
			continue;
		if (size > buf->size)
			break;
		vma->vm_pgoff = 0;	/* dma_mmap_coherent reads it as an offset into the buffer */
		rsdrv_vm_flags_set(vma, RSDRV_VM_FLAGS);
		ret = dma_mmap_coherent(&ep->pdev->dev, vma, buf->cpu, buf->bus, size);
		break;
	}
	mutex_unlock(&ep->lock);
	return ret;
}

int rsdrv_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct rsdrv_ep *ep = file->private_data;
	u64 size = vma->vm_end - vma->vm_start;
	u64 off = (u64)vma->vm_pgoff << PAGE_SHIFT;

	if (!rsdrv_sealed(ep))
		return -EBADFD;
	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;		/* a private copy of device memory makes no sense */
	if (off >= RSDRV_DMA_MMAP_BASE)
		return rsdrv_dma_mmap(ep, vma, off, size);
	if (!rsdrv_mem_allowed(ep, off, size)) {
		rsdrv_refuse(ep, "mmap phys 0x%llx+0x%llx", off, size);
		return -EPERM;
	}
	rsdrv_vm_flags_set(vma, RSDRV_VM_FLAGS);
	vma->vm_page_prot = pgprot_noncached(vma->vm_page_prot);
	return remap_pfn_range(vma, vma->vm_start, vma->vm_pgoff, size,
			       vma->vm_page_prot);
}

long rsdrv_dma_alloc(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_dma req;
	struct rsdrv_dma_buf *buf;
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!ep->pdev) {
		rsdrv_refuse(ep, "DMA buffer: no PCI device in the entry");
		return -EPERM;
	}
	if (req.reserved || !req.size || req.size > RSDRV_MAX_DMA_BUF)
		return -EINVAL;
	buf = kzalloc(sizeof(*buf), GFP_KERNEL_ACCOUNT);
	if (!buf)
		return -ENOMEM;
	buf->size = PAGE_ALIGN(req.size);

	mutex_lock(&ep->lock);
	ret = -ENOSPC;
	if (ep->dma_bytes + buf->size > RSDRV_MAX_DMA_TOTAL)
		goto fail;
	ret = -ENOMEM;
	buf->cpu = dma_alloc_coherent(&ep->pdev->dev, buf->size, &buf->bus, GFP_KERNEL);
	if (!buf->cpu)
		goto fail;
	buf->id = ep->next_dma++;
	ep->dma_bytes += buf->size;
	list_add_tail(&buf->node, &ep->dma_bufs);
	mutex_unlock(&ep->lock);

	req.size = buf->size;
	req.bus_addr = buf->bus;
	req.mmap_offset = RSDRV_DMA_MMAP_BASE + (u64)buf->id * RSDRV_DMA_MMAP_STRIDE;
	req.id = buf->id;
	/* On a fault the buffer stays owned by the endpoint and is freed on release. */
	if (copy_to_user(uarg, &req, sizeof(req)))
		return -EFAULT;
	return 0;
fail:
	mutex_unlock(&ep->lock);
	kfree(buf);
	return ret;
}

void rsdrv_dma_release(struct rsdrv_ep *ep)
{
	struct rsdrv_dma_buf *buf, *tmp;

	/*
	 * The driver may have died with the device still pointed at these
	 * buffers, and without an IOMMU nothing else stops its DMA: no bus
	 * mastering before the pages go back to the kernel.
	 */
	if (!list_empty(&ep->dma_bufs))
		pci_clear_master(ep->pdev);
	list_for_each_entry_safe(buf, tmp, &ep->dma_bufs, node) {
		dma_free_coherent(&ep->pdev->dev, buf->size, buf->cpu, buf->bus);
		list_del(&buf->node);
		kfree(buf);
	}
	ep->dma_bytes = 0;
}
