// SPDX-License-Identifier: GPL-2.0
/* rsdrv: DEVIO and VDEVIO, port I/O on a driver's behalf. */
#include <linux/io.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include "rsdrv_internal.h"

static bool rsdrv_port_allowed(const struct rsdrv_ep *ep, u32 port, u32 width)
{
	unsigned int i;

	for (i = 0; i < ep->n_io; i++) {
		const struct rsdrv_io_range *r = &ep->io[i];

		if (port >= r->base && port + width <= r->base + r->count)
			return true;
	}
	return false;
}

static int rsdrv_pio_check(struct rsdrv_ep *ep, const struct rsdrv_pio *op)
{
	if (op->width != 1 && op->width != 2 && op->width != 4)
		return -EINVAL;
	if (op->dir != RSDRV_PIO_IN && op->dir != RSDRV_PIO_OUT)
		return -EINVAL;
	if (op->dir == RSDRV_PIO_OUT && op->width < 4 &&
	    op->value >> (8 * op->width))
		return -EINVAL;		/* value does not fit the width */
	if (!rsdrv_port_allowed(ep, op->port, op->width)) {
		rsdrv_refuse(ep, "port 0x%x/%u", op->port, op->width);
		return -EPERM;
	}
	return 0;
}

static void rsdrv_pio_do(struct rsdrv_pio *op)
{
	if (op->dir == RSDRV_PIO_OUT) {
		switch (op->width) {
		case 1: outb(op->value, op->port); break;
		case 2: outw(op->value, op->port); break;
		default: outl(op->value, op->port); break;
		}
	} else {
		switch (op->width) {
		case 1: op->value = inb(op->port); break;
		case 2: op->value = inw(op->port); break;
		default: op->value = inl(op->port); break;
		}
	}
}

long rsdrv_pio(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_pio op;
	int ret;

	if (copy_from_user(&op, uarg, sizeof(op)))
		return -EFAULT;
	ret = rsdrv_pio_check(ep, &op);
	if (ret)
		return ret;
	rsdrv_pio_do(&op);
	atomic64_inc(&ep->n_pio);
	if (op.dir == RSDRV_PIO_IN && copy_to_user(uarg, &op, sizeof(op)))
		return -EFAULT;
	return 0;
}

/* The whole batch is checked before any port is touched: all or nothing. */
long rsdrv_vpio(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_vpio req;
	struct rsdrv_pio *ops;
	void __user *uops;
	size_t bytes;
	u32 i;
	long ret = 0;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.reserved || req.count == 0 || req.count > RSDRV_MAX_PIO_BATCH)
		return -EINVAL;
	uops = u64_to_user_ptr(req.ops);
	bytes = (size_t)req.count * sizeof(*ops);
	ops = memdup_user(uops, bytes);
	if (IS_ERR(ops))
		return PTR_ERR(ops);
	for (i = 0; i < req.count && !ret; i++)
		ret = rsdrv_pio_check(ep, &ops[i]);
	if (!ret) {
		for (i = 0; i < req.count; i++)
			rsdrv_pio_do(&ops[i]);
		atomic64_add(req.count, &ep->n_pio);
		if (copy_to_user(uops, ops, bytes))
			ret = -EFAULT;
	}
	kfree(ops);
	return ret;
}
