/* SPDX-License-Identifier: GPL-2.0 */
/* rsdrv: state shared by the module's source files. */
#ifndef RSDRV_INTERNAL_H
#define RSDRV_INTERNAL_H

#include <linux/atomic.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/printk.h>
#include <linux/rwsem.h>
#include <linux/spinlock.h>
#include <linux/sched.h>
#include <linux/types.h>
#include <linux/xarray.h>
#include "rsdrv.h"

#define RSDRV_KEEP_REFUSALS 4
#define RSDRV_MAX_PLACEHOLDERS 4	/* x86 has two it may take: "keyboard" 0x60 and 0x64 */

struct eventfd_ctx;
struct pci_dev;
struct resource;
struct seq_file;
struct vm_area_struct;

/* One IRQ line bound to an eventfd. */
struct rsdrv_irq_line {
	unsigned int irq;
	struct eventfd_ctx *trigger;
	unsigned long masked;		/* bit 0: the handler masked the line */
	atomic64_t delivered;
	char name[RSDRV_LABEL_MAX + 8];	/* shown in /proc/interrupts */
};

struct rsdrv_dma_buf {
	struct list_head node;
	u32 id;
	size_t size;
	void *cpu;
	dma_addr_t bus;
};

/* One open file of /dev/rsdrv. */
struct rsdrv_ep {
	struct list_head node;		/* rsdrv_endpoints, under rsdrv_eps_lock */
	struct mutex lock;		/* set-up, IRQ lines, grant count, DMA */
	bool sealed;			/* set once; readers use rsdrv_sealed() */
	bool labelled;
	char label[RSDRV_LABEL_MAX];
	char res_name[RSDRV_LABEL_MAX + 8];	/* "rsdrv:LABEL": /proc/ioports, /proc/iomem */
	u64 gen;
	pid_t opener;

	/* The privilege entry: written only before sealing, read-only after. */
	struct rsdrv_io_range io[RSDRV_MAX_IO_RANGES];
	unsigned int n_io;
	u32 irqs[RSDRV_MAX_IRQS];
	unsigned int n_irqs;
	struct rsdrv_mem_range mem[RSDRV_MAX_MEM_RANGES];
	unsigned int n_mem;
	char peers[RSDRV_MAX_PEERS][RSDRV_LABEL_MAX];
	unsigned int n_peers;
	struct pci_dev *pdev;		/* claimed: no kernel driver may bind while held */
	const char *pci_saved_override;	/* its driver_override before the claim */

	/* What the entry's ranges hold in the kernel's resource trees (rsdrv_claim.c). */
	struct resource *io_res[RSDRV_MAX_IO_RANGES];
	struct resource *mem_res[RSDRV_MAX_MEM_RANGES];
	/* Legacy placeholders taken out of the port tree for those ranges, put back on release. */
	struct resource *placeholders[RSDRV_MAX_PLACEHOLDERS];
	unsigned int n_placeholders;

	struct rsdrv_irq_line *lines[RSDRV_MAX_IRQS];
	struct xarray grants;		/* id -> struct rsdrv_grant_entry */
	u32 next_grant;
	unsigned int n_grants;
	struct list_head dma_bufs;
	u32 next_dma;
	u64 dma_bytes;

	atomic64_t n_pio, n_irqs_delivered, n_copies, copied_bytes, refused;
	spinlock_t refusals_lock;	/* the last few refusals, for debugfs */
	char refusals[RSDRV_KEEP_REFUSALS][80];
	unsigned int refusals_next;
};

extern struct list_head rsdrv_endpoints;
extern struct rw_semaphore rsdrv_eps_lock;
extern atomic64_t rsdrv_refused_total;

static inline bool rsdrv_sealed(struct rsdrv_ep *ep)
{
	return smp_load_acquire(&ep->sealed);
}

/* Count, remember (debugfs) and log (rate-limited) a refused attempt. */
__printf(2, 3) void rsdrv_refuse(struct rsdrv_ep *ep, const char *fmt, ...);

bool rsdrv_label_valid(const char *label);
bool rsdrv_label_alive(const char *label);

long rsdrv_pio(struct rsdrv_ep *ep, void __user *uarg);
long rsdrv_vpio(struct rsdrv_ep *ep, void __user *uarg);

long rsdrv_irq_bind(struct rsdrv_ep *ep, void __user *uarg);
long rsdrv_irq_reenable(struct rsdrv_ep *ep, void __user *uarg);
long rsdrv_irq_unbind(struct rsdrv_ep *ep, void __user *uarg);
void rsdrv_irq_release(struct rsdrv_ep *ep);

long rsdrv_grant(struct rsdrv_ep *ep, void __user *uarg);
long rsdrv_revoke(struct rsdrv_ep *ep, void __user *uarg);
long rsdrv_safecopy(struct rsdrv_ep *ep, void __user *uarg);
long rsdrv_vsafecopy(struct rsdrv_ep *ep, void __user *uarg);
void rsdrv_grants_release(struct rsdrv_ep *ep);

int rsdrv_claim_io(struct rsdrv_ep *ep, const struct rsdrv_io_range *r);
int rsdrv_claim_mem(struct rsdrv_ep *ep, const struct rsdrv_mem_range *r);
int rsdrv_claim_pci(struct rsdrv_ep *ep, struct pci_dev *pdev);
void rsdrv_claims_release(struct rsdrv_ep *ep);

int rsdrv_mmap(struct file *file, struct vm_area_struct *vma);
long rsdrv_dma_alloc(struct rsdrv_ep *ep, void __user *uarg);
void rsdrv_dma_release(struct rsdrv_ep *ep);

void rsdrv_debugfs_init(void);
void rsdrv_debugfs_exit(void);

#endif
