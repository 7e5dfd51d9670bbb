// SPDX-License-Identifier: GPL-2.0
/*
 * rsdrv: IRQ lines delivered to user space as eventfd signals.
 *
 * The handler masks the line (disable_irq_nosync) and signals the eventfd;
 * the driver unmasks it with RSDRV_IOC_IRQ_REENABLE once it has quieted its
 * device (MINIX's IRQ_REENABLE).  Lines are never shared: the handler
 * cannot tell whose device interrupted, and keeping a shared line masked
 * until a user process runs would starve the other devices on it.  So
 * request_irq is called without IRQF_SHARED, and a line already in use
 * is refused with EBUSY.
 */
#include <linux/eventfd.h>
#include <linux/interrupt.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include "rsdrv_compat.h"
#include "rsdrv_internal.h"

static irqreturn_t rsdrv_irq_handler(int irq, void *data)
{
	struct rsdrv_irq_line *line = data;

	disable_irq_nosync(irq);
	/* Set after masking, so REENABLE enables at most once per mask. */
	set_bit(0, &line->masked);
	atomic64_inc(&line->delivered);
	rsdrv_eventfd_signal(line->trigger);
	return IRQ_HANDLED;
}

static int rsdrv_irq_slot(struct rsdrv_ep *ep, u32 irq)
{
	int i;

	for (i = 0; i < RSDRV_MAX_IRQS; i++)
		if (ep->lines[i] && ep->lines[i]->irq == irq)
			return i;
	return -1;
}

static bool rsdrv_irq_allowed(const struct rsdrv_ep *ep, u32 irq)
{
	unsigned int i;

	for (i = 0; i < ep->n_irqs; i++)
		if (ep->irqs[i] == irq)
			return true;
	return false;
}

static void rsdrv_irq_free(struct rsdrv_irq_line *line)
{
	/*
	 * We are the line's only action, so free_irq shuts the line down and
	 * resets its disable depth: no enable_irq needed even if masked.
	 */
	free_irq(line->irq, line);
	eventfd_ctx_put(line->trigger);
	kfree(line);
}

long rsdrv_irq_bind(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_irq_bind req;
	struct rsdrv_irq_line *line;
	struct eventfd_ctx *trigger;
	int slot, ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!rsdrv_irq_allowed(ep, req.irq)) {
		rsdrv_refuse(ep, "irq %u", req.irq);
		return -EPERM;
	}
	trigger = eventfd_ctx_fdget(req.eventfd);
	if (IS_ERR(trigger))
		return PTR_ERR(trigger);
	line = kzalloc(sizeof(*line), GFP_KERNEL_ACCOUNT);
	if (!line) {
		eventfd_ctx_put(trigger);
		return -ENOMEM;
	}
	line->irq = req.irq;
	line->trigger = trigger;
	snprintf(line->name, sizeof(line->name), "rsdrv:%s", ep->label);

	mutex_lock(&ep->lock);
	ret = -EBUSY;
	if (rsdrv_irq_slot(ep, req.irq) >= 0)
		goto fail;
	for (slot = 0; slot < RSDRV_MAX_IRQS && ep->lines[slot]; slot++)
		;
	ret = -ENOSPC;
	if (slot == RSDRV_MAX_IRQS)
		goto fail;
	ret = request_irq(req.irq, rsdrv_irq_handler, 0, line->name, line);
	if (ret) {
		pr_warn_ratelimited("rsdrv: %s/%llu: irq %u: request_irq failed (%d)%s\n",
				    ep->label, ep->gen, req.irq, ret,
				    ret == -EBUSY ? ": line in use, rsdrv does not share lines" : "");
		goto fail;
	}
	ep->lines[slot] = line;
	mutex_unlock(&ep->lock);
	return 0;
fail:
	mutex_unlock(&ep->lock);
	eventfd_ctx_put(trigger);
	kfree(line);
	return ret;
}

long rsdrv_irq_reenable(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_irq_line *line;
	u32 irq;
	int slot;
	long ret = 0;

	if (get_user(irq, (u32 __user *)uarg))
		return -EFAULT;
	mutex_lock(&ep->lock);
	slot = rsdrv_irq_slot(ep, irq);
	if (slot < 0) {
		ret = -EINVAL;		/* not bound on this endpoint */
	} else {
		line = ep->lines[slot];
		if (test_and_clear_bit(0, &line->masked))
			enable_irq(line->irq);
	}
	mutex_unlock(&ep->lock);
	return ret;
}

long rsdrv_irq_unbind(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_irq_line *line = NULL;
	u32 irq;
	int slot;

	if (get_user(irq, (u32 __user *)uarg))
		return -EFAULT;
	mutex_lock(&ep->lock);
	slot = rsdrv_irq_slot(ep, irq);
	if (slot >= 0) {
		line = ep->lines[slot];
		ep->lines[slot] = NULL;
		atomic64_add(atomic64_read(&line->delivered), &ep->n_irqs_delivered);
	}
	mutex_unlock(&ep->lock);
	if (!line)
		return -EINVAL;
	rsdrv_irq_free(line);
	return 0;
}

void rsdrv_irq_release(struct rsdrv_ep *ep)
{
	int i;

	for (i = 0; i < RSDRV_MAX_IRQS; i++) {
		if (ep->lines[i]) {
			rsdrv_irq_free(ep->lines[i]);
			ep->lines[i] = NULL;
		}
	}
}
