// SPDX-License-Identifier: GPL-2.0
/*
 * rsdrv: /dev/rsdrv, the privilege table of user-mode drivers.
 *
 * Each open file is one endpoint.  A process with CAP_SYS_RAWIO gives it a
 * label and generation and the resources it may use, then seals it; the
 * file is passed to an unprivileged driver, which can use exactly those
 * resources through the other ioctls and mmap, and nothing else.
 */
#include <linux/capability.h>
#include <linux/ctype.h>
#include <linux/fs.h>
#include <linux/ioport.h>
#include <linux/irqnr.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include "rsdrv_internal.h"

LIST_HEAD(rsdrv_endpoints);
DECLARE_RWSEM(rsdrv_eps_lock);
atomic64_t rsdrv_refused_total = ATOMIC64_INIT(0);

/*
 * Per label, generations only grow while the module is loaded, so none is
 * reused.  One small record per label ever set up (set-up needs
 * CAP_SYS_RAWIO, so unprivileged callers cannot grow the list).
 */
struct rsdrv_gen_record {
	struct list_head node;
	char label[RSDRV_LABEL_MAX];
	u64 last;
};
static DEFINE_MUTEX(rsdrv_gen_lock);
static LIST_HEAD(rsdrv_gens);

/* The generation in force for label: 0 asks for the next one. */
static int rsdrv_claim_generation(const char *label, u64 *gen)
{
	struct rsdrv_gen_record *rec;
	int ret = 0;

	mutex_lock(&rsdrv_gen_lock);
	list_for_each_entry(rec, &rsdrv_gens, node)
		if (!strcmp(rec->label, label))
			goto found;
	rec = kzalloc(sizeof(*rec), GFP_KERNEL);
	if (!rec) {
		ret = -ENOMEM;
		goto out;
	}
	memcpy(rec->label, label, RSDRV_LABEL_MAX);
	list_add(&rec->node, &rsdrv_gens);
found:
	if (!*gen)
		*gen = rec->last + 1;
	if (*gen <= rec->last || *gen == U64_MAX)
		ret = -EEXIST;		/* that generation was (or may have been) used */
	else
		rec->last = *gen;
out:
	mutex_unlock(&rsdrv_gen_lock);
	return ret;
}

static void rsdrv_gens_free(void)
{
	struct rsdrv_gen_record *rec, *tmp;

	list_for_each_entry_safe(rec, tmp, &rsdrv_gens, node)
		kfree(rec);
}

bool rsdrv_label_valid(const char *label)
{
	size_t i;

	for (i = 0; i < RSDRV_LABEL_MAX && label[i]; i++) {
		char c = label[i];

		if (!isalnum(c) && c != '_' && c != '-' && c != '.')
			return false;
	}
	return i > 0 && i < RSDRV_LABEL_MAX;
}

void rsdrv_refuse(struct rsdrv_ep *ep, const char *fmt, ...)
{
	char what[80];
	va_list args;

	va_start(args, fmt);
	vsnprintf(what, sizeof(what), fmt, args);
	va_end(args);
	atomic64_inc(&ep->refused);
	atomic64_inc(&rsdrv_refused_total);
	spin_lock(&ep->refusals_lock);
	snprintf(ep->refusals[ep->refusals_next++ % RSDRV_KEEP_REFUSALS],
		 sizeof(ep->refusals[0]), "pid %d: %s", task_tgid_nr(current), what);
	spin_unlock(&ep->refusals_lock);
	pr_warn_ratelimited("rsdrv: %s/%llu (pid %d): refused %s\n",
			    READ_ONCE(ep->labelled) ? ep->label : "-", ep->gen,
			    task_tgid_nr(current), what);
}

/* Caller holds rsdrv_eps_lock. */
bool rsdrv_label_alive(const char *label)
{
	struct rsdrv_ep *ep;

	list_for_each_entry(ep, &rsdrv_endpoints, node)
		if (rsdrv_sealed(ep) && !strcmp(ep->label, label))
			return true;
	return false;
}

static int rsdrv_open(struct inode *inode, struct file *file)
{
	struct rsdrv_ep *ep = kzalloc(sizeof(*ep), GFP_KERNEL_ACCOUNT);

	if (!ep)
		return -ENOMEM;
	mutex_init(&ep->lock);
	spin_lock_init(&ep->refusals_lock);
	xa_init_flags(&ep->grants, XA_FLAGS_ALLOC1);
	INIT_LIST_HEAD(&ep->dma_bufs);
	ep->opener = task_tgid_nr(current);
	file->private_data = ep;
	down_write(&rsdrv_eps_lock);
	list_add_tail(&ep->node, &rsdrv_endpoints);
	up_write(&rsdrv_eps_lock);
	return nonseekable_open(inode, file);
}

static int rsdrv_release(struct inode *inode, struct file *file)
{
	struct rsdrv_ep *ep = file->private_data;

	/* Unlisted first: no safecopy can find it or its grants any more. */
	down_write(&rsdrv_eps_lock);
	list_del(&ep->node);
	up_write(&rsdrv_eps_lock);

	rsdrv_irq_release(ep);
	rsdrv_grants_release(ep);
	if (ep->pdev)
		rsdrv_dma_release(ep);
	rsdrv_claims_release(ep);	/* last: the kernel may take the device now */
	if (ep->pdev)
		pci_dev_put(ep->pdev);
	mutex_destroy(&ep->lock);
	kfree(ep);
	return 0;
}

/* Set-up ioctls: CAP_SYS_RAWIO and an unsealed entry.  Returns with ep->lock held. */
static int rsdrv_setup_begin(struct rsdrv_ep *ep, const char *what)
{
	if (!capable(CAP_SYS_RAWIO)) {
		rsdrv_refuse(ep, "%s: caller lacks CAP_SYS_RAWIO", what);
		return -EPERM;
	}
	mutex_lock(&ep->lock);
	if (ep->sealed) {
		mutex_unlock(&ep->lock);
		rsdrv_refuse(ep, "%s: entry is sealed", what);
		return -EPERM;
	}
	return 0;
}

static long rsdrv_set_label(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_label req;
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!rsdrv_label_valid(req.label))
		return -EINVAL;
	ret = rsdrv_setup_begin(ep, "set label");
	if (ret)
		return ret;
	ret = -EEXIST;
	if (ep->labelled)
		goto out;
	ret = rsdrv_claim_generation(req.label, &req.generation);
	if (ret)
		goto out;
	memcpy(ep->label, req.label, RSDRV_LABEL_MAX);
	snprintf(ep->res_name, sizeof(ep->res_name), "rsdrv:%s", ep->label);
	ep->gen = req.generation;
	ep->labelled = true;
out:
	mutex_unlock(&ep->lock);
	/* Outside ep->lock: a fault here takes mmap_lock, which mmap() holds before ep->lock. */
	if (!ret && copy_to_user(uarg, &req, sizeof(req)))
		ret = -EFAULT;
	return ret;
}

static long rsdrv_allow_io(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_io_range r;
	long ret;

	if (copy_from_user(&r, uarg, sizeof(r)))
		return -EFAULT;
	if (!r.count || r.base > 0xffff || r.count > 0x10000 - r.base)
		return -EINVAL;
	ret = rsdrv_setup_begin(ep, "allow io");
	if (ret)
		return ret;
	if (!ep->labelled)
		ret = -EINVAL;		/* the reservation is named after the label */
	else if (ep->n_io == RSDRV_MAX_IO_RANGES)
		ret = -ENOSPC;
	else if (!(ret = rsdrv_claim_io(ep, &r)))
		ep->io[ep->n_io++] = r;
	mutex_unlock(&ep->lock);
	return ret;
}

static long rsdrv_allow_irq(struct rsdrv_ep *ep, void __user *uarg)
{
	u32 irq;
	long ret;

	if (get_user(irq, (u32 __user *)uarg))
		return -EFAULT;
	if (irq >= nr_irqs)
		return -EINVAL;
	ret = rsdrv_setup_begin(ep, "allow irq");
	if (ret)
		return ret;
	if (ep->n_irqs == RSDRV_MAX_IRQS)
		ret = -ENOSPC;
	else
		ep->irqs[ep->n_irqs++] = irq;
	mutex_unlock(&ep->lock);
	return ret;
}

static long rsdrv_allow_mem(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_mem_range r;
	long ret;

	if (copy_from_user(&r, uarg, sizeof(r)))
		return -EFAULT;
	if (!r.size || !PAGE_ALIGNED(r.phys) || !PAGE_ALIGNED(r.size) ||
	    r.phys + r.size < r.phys || r.phys + r.size > (1ULL << MAX_PHYSMEM_BITS))
		return -EINVAL;
	/* Never hand out the kernel's own memory, whatever the caller asks. */
	if (region_intersects(r.phys, r.size, IORESOURCE_SYSTEM_RAM,
			      IORES_DESC_NONE) != REGION_DISJOINT)
		return -EINVAL;
	ret = rsdrv_setup_begin(ep, "allow mem");
	if (ret)
		return ret;
	if (!ep->labelled)
		ret = -EINVAL;		/* the reservation is named after the label */
	else if (ep->n_mem == RSDRV_MAX_MEM_RANGES)
		ret = -ENOSPC;
	else if (!(ret = rsdrv_claim_mem(ep, &r)))
		ep->mem[ep->n_mem++] = r;
	mutex_unlock(&ep->lock);
	return ret;
}

static long rsdrv_allow_pci(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_pci req;
	struct pci_dev *pdev;
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.reserved || req.domain > 0xffff || req.bus > 0xff || req.devfn > 0xff)
		return -EINVAL;
	ret = rsdrv_setup_begin(ep, "allow pci");
	if (ret)
		return ret;
	ret = -EEXIST;
	if (ep->pdev)
		goto out;
	pdev = pci_get_domain_bus_and_slot(req.domain, req.bus, req.devfn);
	ret = -ENODEV;
	if (!pdev)
		goto out;
	ret = rsdrv_claim_pci(ep, pdev);
	if (ret) {
		pci_dev_put(pdev);
		goto out;
	}
	ep->pdev = pdev;	/* reference and claim dropped on release */
out:
	mutex_unlock(&ep->lock);
	return ret;
}

static long rsdrv_allow_grant_to(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_peer peer;
	long ret;

	if (copy_from_user(&peer, uarg, sizeof(peer)))
		return -EFAULT;
	if (!rsdrv_label_valid(peer.label))
		return -EINVAL;
	ret = rsdrv_setup_begin(ep, "allow grant");
	if (ret)
		return ret;
	if (ep->n_peers == RSDRV_MAX_PEERS)
		ret = -ENOSPC;
	else
		memcpy(ep->peers[ep->n_peers++], peer.label, RSDRV_LABEL_MAX);
	mutex_unlock(&ep->lock);
	return ret;
}

static long rsdrv_seal(struct rsdrv_ep *ep)
{
	long ret = rsdrv_setup_begin(ep, "seal");

	if (ret)
		return ret;
	if (!ep->labelled)
		ret = -EINVAL;		/* a label first: grants and logs need it */
	else
		smp_store_release(&ep->sealed, true);
	mutex_unlock(&ep->lock);
	return ret;
}

static long rsdrv_info(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_info info = { .api_version = RSDRV_API_VERSION };

	mutex_lock(&ep->lock);
	memcpy(info.label, ep->label, RSDRV_LABEL_MAX);
	info.generation = ep->gen;
	info.flags = (ep->sealed ? RSDRV_INFO_SEALED : 0) | (ep->pdev ? RSDRV_INFO_DMA : 0);
	mutex_unlock(&ep->lock);
	return copy_to_user(uarg, &info, sizeof(info)) ? -EFAULT : 0;
}

static long rsdrv_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct rsdrv_ep *ep = file->private_data;
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case RSDRV_IOC_SET_LABEL:	return rsdrv_set_label(ep, uarg);
	case RSDRV_IOC_ALLOW_IO:	return rsdrv_allow_io(ep, uarg);
	case RSDRV_IOC_ALLOW_IRQ:	return rsdrv_allow_irq(ep, uarg);
	case RSDRV_IOC_ALLOW_MEM:	return rsdrv_allow_mem(ep, uarg);
	case RSDRV_IOC_ALLOW_PCI:	return rsdrv_allow_pci(ep, uarg);
	case RSDRV_IOC_ALLOW_GRANT_TO:	return rsdrv_allow_grant_to(ep, uarg);
	case RSDRV_IOC_SEAL:		return rsdrv_seal(ep);
	case RSDRV_IOC_INFO:		return rsdrv_info(ep, uarg);
	case RSDRV_IOC_PIO:
	case RSDRV_IOC_VPIO:
	case RSDRV_IOC_IRQ_BIND:
	case RSDRV_IOC_IRQ_REENABLE:
	case RSDRV_IOC_IRQ_UNBIND:
	case RSDRV_IOC_GRANT:
	case RSDRV_IOC_REVOKE:
	case RSDRV_IOC_SAFECOPY:
	case RSDRV_IOC_VSAFECOPY:
	case RSDRV_IOC_DMA_ALLOC:
		break;
	default:
		return -ENOTTY;
	}

	/* Everything below uses the entry, which is in force only once sealed. */
	if (!rsdrv_sealed(ep)) {
		rsdrv_refuse(ep, "ioctl 0x%x on an unsealed endpoint", cmd);
		return -EBADFD;
	}
	switch (cmd) {
	case RSDRV_IOC_PIO:		return rsdrv_pio(ep, uarg);
	case RSDRV_IOC_VPIO:		return rsdrv_vpio(ep, uarg);
	case RSDRV_IOC_IRQ_BIND:	return rsdrv_irq_bind(ep, uarg);
	case RSDRV_IOC_IRQ_REENABLE:	return rsdrv_irq_reenable(ep, uarg);
	case RSDRV_IOC_IRQ_UNBIND:	return rsdrv_irq_unbind(ep, uarg);
	case RSDRV_IOC_GRANT:		return rsdrv_grant(ep, uarg);
	case RSDRV_IOC_REVOKE:		return rsdrv_revoke(ep, uarg);
	case RSDRV_IOC_SAFECOPY:	return rsdrv_safecopy(ep, uarg);
	case RSDRV_IOC_VSAFECOPY:	return rsdrv_vsafecopy(ep, uarg);
	default:			return rsdrv_dma_alloc(ep, uarg);
	}
}

static const struct file_operations rsdrv_fops = {
	.owner		= THIS_MODULE,	/* an open endpoint pins the module */
	.open		= rsdrv_open,
	.release	= rsdrv_release,
	.unlocked_ioctl	= rsdrv_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.mmap		= rsdrv_mmap,
	/* no .llseek: rsdrv_open makes the file nonseekable (lseek gives ESPIPE) */
};

static struct miscdevice rsdrv_misc = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "rsdrv",
	.fops	= &rsdrv_fops,
	.mode	= 0600,			/* only rsd opens it; drivers inherit files */
};

static int __init rsdrv_init(void)
{
	int ret = misc_register(&rsdrv_misc);

	if (ret)
		return ret;
	rsdrv_debugfs_init();
	pr_info("rsdrv: /dev/rsdrv ready (api %d)\n", RSDRV_API_VERSION);
	return 0;
}

static void __exit rsdrv_exit(void)
{
	rsdrv_debugfs_exit();
	misc_deregister(&rsdrv_misc);
	rsdrv_gens_free();
}

module_init(rsdrv_init);
module_exit(rsdrv_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("rsdrv: privileges, port I/O, IRQs, memory, copy grants and DMA buffers for user-mode drivers");
