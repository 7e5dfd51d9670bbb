// SPDX-License-Identifier: GPL-2.0
/* rsdrv: /sys/kernel/debug/rsdrv/endpoints, a read-only view for root. */
#include <linux/debugfs.h>
#include <linux/pci.h>
#include <linux/seq_file.h>
#include "rsdrv_internal.h"

static struct dentry *rsdrv_debugfs_dir;

/* Oldest first; copied out under the spinlock, printed outside it. */
static void rsdrv_show_refusals(struct seq_file *s, struct rsdrv_ep *ep)
{
	char copy[RSDRV_KEEP_REFUSALS][80];
	unsigned int next, i, n;

	spin_lock(&ep->refusals_lock);
	next = ep->refusals_next;
	memcpy(copy, ep->refusals, sizeof(copy));
	spin_unlock(&ep->refusals_lock);
	n = min_t(unsigned int, next, RSDRV_KEEP_REFUSALS);
	for (i = next - n; i != next; i++)
		seq_printf(s, "  refused: %s\n", copy[i % RSDRV_KEEP_REFUSALS]);
}

static void rsdrv_show_ep(struct seq_file *s, struct rsdrv_ep *ep)
{
	unsigned int i;
	u64 irqs = atomic64_read(&ep->n_irqs_delivered);

	mutex_lock(&ep->lock);
	seq_printf(s, "endpoint %s gen %llu opener %d %s\n",
		   ep->labelled ? ep->label : "-", ep->gen, ep->opener,
		   ep->sealed ? "sealed" : "unsealed");
	for (i = 0; i < ep->n_io; i++)
		seq_printf(s, "  io 0x%x-0x%x\n", ep->io[i].base,
			   ep->io[i].base + ep->io[i].count - 1);
	for (i = 0; i < ep->n_placeholders; i++)
		seq_printf(s, "  took-placeholder %s 0x%llx-0x%llx\n", ep->placeholders[i]->name,
			   (unsigned long long)ep->placeholders[i]->start,
			   (unsigned long long)ep->placeholders[i]->end);
	for (i = 0; i < ep->n_irqs; i++)
		seq_printf(s, "  irq %u\n", ep->irqs[i]);
	for (i = 0; i < ep->n_mem; i++)
		seq_printf(s, "  mem 0x%llx-0x%llx\n", ep->mem[i].phys,
			   ep->mem[i].phys + ep->mem[i].size - 1);
	for (i = 0; i < ep->n_peers; i++)
		seq_printf(s, "  grant-to %s\n", ep->peers[i]);
	if (ep->pdev)
		seq_printf(s, "  pci %s dma-buffers %llu bytes%s\n", pci_name(ep->pdev),
			   ep->dma_bytes, ep->dma_bytes ? " DMA-NOT-ISOLATED" : "");
	for (i = 0; i < RSDRV_MAX_IRQS; i++) {
		struct rsdrv_irq_line *line = ep->lines[i];

		if (!line)
			continue;
		irqs += atomic64_read(&line->delivered);
		seq_printf(s, "  bound irq %u %s\n", line->irq,
			   test_bit(0, &line->masked) ? "masked" : "enabled");
	}
	seq_printf(s, "  grants %u pio %lld irqs %llu copies %lld copied-bytes %lld refused %lld\n",
		   ep->n_grants, atomic64_read(&ep->n_pio), irqs,
		   atomic64_read(&ep->n_copies), atomic64_read(&ep->copied_bytes),
		   atomic64_read(&ep->refused));
	mutex_unlock(&ep->lock);
	rsdrv_show_refusals(s, ep);
}

static int rsdrv_endpoints_show(struct seq_file *s, void *unused)
{
	struct rsdrv_ep *ep;

	seq_printf(s, "refused-total %lld\n", atomic64_read(&rsdrv_refused_total));
	down_read(&rsdrv_eps_lock);
	list_for_each_entry(ep, &rsdrv_endpoints, node)
		rsdrv_show_ep(s, ep);
	up_read(&rsdrv_eps_lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(rsdrv_endpoints);

void rsdrv_debugfs_init(void)
{
	rsdrv_debugfs_dir = debugfs_create_dir("rsdrv", NULL);
	debugfs_create_file("endpoints", 0400, rsdrv_debugfs_dir, NULL,
			    &rsdrv_endpoints_fops);
}

void rsdrv_debugfs_exit(void)
{
	debugfs_remove_recursive(rsdrv_debugfs_dir);
}
