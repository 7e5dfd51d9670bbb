// SPDX-License-Identifier: GPL-2.0
/*
 * rsdrv: copy grants (MINIX's safecopy).
 *
 * A grant names a region of the granter's address space, the label that
 * may use it and the directions allowed.  It pins the granter's mm_struct
 * (mmgrab), not its pages: a copy takes a user reference (mmget_not_zero),
 * which fails once the granter has exited, then pins only the pages it
 * copies (pin_user_pages_remote) and copies between them and the caller's
 * buffer without a bounce buffer.
 *
 * Revoke returns only once no copy can touch the region any more (MINIX:
 * no access after revoke).  A copy holds a reference on the grant and
 * takes the grant's rwsem shared around each piece it moves, checking
 * `revoked` under it; revoke unlists the grant, then takes the rwsem
 * exclusively to set `revoked`.  A piece is moved with page faults off
 * (the caller's buffer is the caller's: it must not be able to stall a
 * revoke by making its own fault slow); a fault drops the rwsem, faults the
 * caller's page in and retries.  So revoke waits for at most one page's
 * memcpy per copy in flight.
 */
#include <linux/highmem.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/refcount.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include "rsdrv_compat.h"
#include "rsdrv_internal.h"

#define RSDRV_PIN_BATCH 16

struct rsdrv_grant_entry {
	refcount_t ref;			/* the endpoint's table, and each copy in flight */
	struct rw_semaphore sem;	/* shared: a copy moving bytes; exclusive: revoke */
	bool revoked;			/* under sem */
	u64 addr;
	u64 len;
	u32 access;
	char grantee[RSDRV_LABEL_MAX];
	struct mm_struct *mm;
};

static void rsdrv_grant_put(struct rsdrv_grant_entry *g)
{
	if (refcount_dec_and_test(&g->ref)) {
		mmdrop(g->mm);
		kfree(g);
	}
}

/* g is no longer in the table; returns once no copy can touch its region. */
static void rsdrv_grant_kill(struct rsdrv_grant_entry *g)
{
	down_write(&g->sem);
	WRITE_ONCE(g->revoked, true);	/* also read unlocked, as an early out */
	up_write(&g->sem);
	rsdrv_grant_put(g);
}

static bool rsdrv_peer_allowed(const struct rsdrv_ep *ep, const char *label)
{
	unsigned int i;

	for (i = 0; i < ep->n_peers; i++)
		if (!strcmp(ep->peers[i], label))
			return true;
	return false;
}

long rsdrv_grant(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_grant req;
	struct rsdrv_grant_entry *g;
	u32 id;
	int ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.access || (req.access & ~(RSDRV_GRANT_READ | RSDRV_GRANT_WRITE)))
		return -EINVAL;
	if (!req.len || req.len > RSDRV_MAX_GRANT_LEN || req.addr + req.len < req.addr)
		return -EINVAL;
	if (!access_ok(u64_to_user_ptr(req.addr), req.len))
		return -EFAULT;
	if (!rsdrv_label_valid(req.grantee))
		return -EINVAL;
	if (!rsdrv_peer_allowed(ep, req.grantee)) {
		rsdrv_refuse(ep, "grant to %.31s", req.grantee);
		return -EPERM;
	}
	g = kzalloc(sizeof(*g), GFP_KERNEL_ACCOUNT);
	if (!g)
		return -ENOMEM;
	g->addr = req.addr;
	g->len = req.len;
	g->access = req.access;
	memcpy(g->grantee, req.grantee, RSDRV_LABEL_MAX);
	refcount_set(&g->ref, 1);
	init_rwsem(&g->sem);
	g->mm = current->mm;
	mmgrab(g->mm);

	mutex_lock(&ep->lock);
	ret = -ENOSPC;
	if (ep->n_grants < RSDRV_MAX_GRANTS) {
		/* Cyclic ids: a revoked id is not handed out again soon. */
		ret = xa_alloc_cyclic(&ep->grants, &id, g, XA_LIMIT(1, INT_MAX),
				      &ep->next_grant, GFP_KERNEL_ACCOUNT);
		if (ret >= 0) {
			ep->n_grants++;
			ret = 0;
		}
	}
	mutex_unlock(&ep->lock);
	if (ret) {
		rsdrv_grant_put(g);
		return ret;
	}
	if (put_user(id, &((struct rsdrv_grant __user *)uarg)->id)) {
		mutex_lock(&ep->lock);
		if (xa_erase(&ep->grants, id) == g)
			ep->n_grants--;
		mutex_unlock(&ep->lock);
		rsdrv_grant_kill(g);
		return -EFAULT;
	}
	return 0;
}

long rsdrv_revoke(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_grant_entry *g;
	u32 id;

	if (get_user(id, (u32 __user *)uarg))
		return -EFAULT;
	mutex_lock(&ep->lock);
	g = xa_erase(&ep->grants, id);
	if (g)
		ep->n_grants--;
	mutex_unlock(&ep->lock);
	if (!g)
		return -ENOENT;
	rsdrv_grant_kill(g);
	return 0;
}

void rsdrv_grants_release(struct rsdrv_ep *ep)
{
	struct rsdrv_grant_entry *g;
	unsigned long id;

	xa_for_each(&ep->grants, id, g) {
		xa_erase(&ep->grants, id);
		rsdrv_grant_kill(g);
	}
	ep->n_grants = 0;
	xa_destroy(&ep->grants);
}

/*
 * Move up to chunk bytes between a pinned granter page and the caller's
 * buffer while the grant is still in force.  Returns the bytes moved (short
 * if the caller's page is not present), or -ENOENT once revoked.
 */
static long rsdrv_copy_piece(struct rsdrv_grant_entry *g, struct page *page,
			     unsigned long off, void __user *ubuf, size_t chunk,
			     bool to_granter)
{
	unsigned long left;
	char *kaddr;

	down_read(&g->sem);
	if (g->revoked) {
		up_read(&g->sem);
		return -ENOENT;
	}
	kaddr = kmap_local_page(page);
	pagefault_disable();
	if (to_granter)
		left = __copy_from_user_inatomic(kaddr + off, ubuf, chunk);
	else
		left = __copy_to_user_inatomic(ubuf, kaddr + off, chunk);
	pagefault_enable();
	kunmap_local(kaddr);
	up_read(&g->sem);
	return chunk - left;
}

/* Copy len bytes between the granter's raddr and the caller's laddr. */
static int rsdrv_copy_pages(struct rsdrv_grant_entry *g, struct mm_struct *mm, u64 raddr,
			    u64 laddr, u64 len, bool to_granter)
{
	struct page *pages[RSDRV_PIN_BATCH];
	unsigned int gup_flags = to_granter ? FOLL_WRITE : 0;

	while (len) {
		unsigned long off = raddr & ~PAGE_MASK;
		unsigned long npages = min_t(u64, RSDRV_PIN_BATCH,
					     (off + len + PAGE_SIZE - 1) >> PAGE_SHIFT);
		int locked = 1;
		long pinned, i = 0;
		int ret = 0;

		if (READ_ONCE(g->revoked))
			return -ENOENT;		/* early out; the check that counts is under g->sem */
		if (mmap_read_lock_killable(mm))
			return -EINTR;
		pinned = rsdrv_pin_user_pages_remote(mm, raddr & PAGE_MASK, npages,
						     gup_flags, pages, &locked);
		if (locked)
			mmap_read_unlock(mm);
		if (pinned <= 0)
			return pinned == -EINTR ? -EINTR : -EFAULT;

		while (i < pinned && len) {
			size_t chunk = min_t(u64, PAGE_SIZE - off, len);
			void __user *ubuf = u64_to_user_ptr(laddr);
			long moved = rsdrv_copy_piece(g, pages[i], off, ubuf, chunk, to_granter);

			if (moved < 0) {
				ret = moved;
				break;
			}
			raddr += moved;
			laddr += moved;
			len -= moved;
			off += moved;
			if (off == PAGE_SIZE) {
				off = 0;
				i++;
			}
			if ((size_t)moved == chunk)
				continue;
			/* Our own page is not present: fault it in without the grant's lock. */
			ubuf = u64_to_user_ptr(laddr);
			chunk -= moved;
			if ((to_granter ? fault_in_readable(ubuf, chunk)
					: fault_in_writeable(ubuf, chunk)) == chunk) {
				ret = -EFAULT;
				break;
			}
			if (fatal_signal_pending(current)) {
				ret = -EINTR;
				break;
			}
		}
		unpin_user_pages_dirty_lock(pages, pinned, to_granter);
		if (ret)
			return ret;
		if (fatal_signal_pending(current))
			return -EINTR;
		cond_resched();		/* a grant may be up to 1 GiB */
	}
	return 0;
}

static struct rsdrv_ep *rsdrv_find_endpoint(const char *label, u64 gen)
{
	struct rsdrv_ep *ep;

	list_for_each_entry(ep, &rsdrv_endpoints, node)
		if (rsdrv_sealed(ep) && ep->gen == gen && !strcmp(ep->label, label))
			return ep;
	return NULL;
}

static int rsdrv_copy_one(struct rsdrv_ep *me, const struct rsdrv_safecopy *c)
{
	struct rsdrv_grant_entry *g;
	struct rsdrv_ep *granter;
	struct mm_struct *mm = NULL;
	u32 need = c->dir == RSDRV_COPY_TO_GRANT ? RSDRV_GRANT_WRITE : RSDRV_GRANT_READ;
	u64 raddr = 0;
	int ret;

	if (c->dir != RSDRV_COPY_FROM_GRANT && c->dir != RSDRV_COPY_TO_GRANT)
		return -EINVAL;
	if (!rsdrv_label_valid(c->granter))
		return -EINVAL;
	if (!c->len || c->len > RSDRV_MAX_GRANT_LEN)
		return -EINVAL;
	if (!access_ok(u64_to_user_ptr(c->addr), c->len))
		return -EFAULT;

	down_read(&rsdrv_eps_lock);
	granter = rsdrv_find_endpoint(c->granter, c->granter_gen);
	if (!granter) {
		ret = rsdrv_label_alive(c->granter) ? -ESTALE : -ESRCH;
		up_read(&rsdrv_eps_lock);
		return ret;
	}
	xa_lock(&granter->grants);
	g = xa_load(&granter->grants, c->grant_id);
	if (!g)
		ret = -ENOENT;
	else if (strcmp(g->grantee, me->label))
		ret = -EPERM;
	else if (!(g->access & need))
		ret = -EACCES;
	else if (c->offset > g->len || c->len > g->len - c->offset)
		ret = -ERANGE;
	else if (!mmget_not_zero(g->mm))
		ret = -ESRCH;		/* the granter has exited */
	else {
		refcount_inc(&g->ref);	/* g outlives a revoke that races this copy */
		mm = g->mm;
		raddr = g->addr + c->offset;
		ret = 0;
	}
	xa_unlock(&granter->grants);
	up_read(&rsdrv_eps_lock);
	if (ret) {
		if (ret == -EPERM || ret == -EACCES || ret == -ERANGE)
			rsdrv_refuse(me, "safecopy %s/%llu grant %u (%d)",
				     c->granter, c->granter_gen, c->grant_id, ret);
		return ret;
	}
	ret = rsdrv_copy_pages(g, mm, raddr, c->addr, c->len, need == RSDRV_GRANT_WRITE);
	mmput(mm);
	rsdrv_grant_put(g);
	if (!ret) {
		atomic64_inc(&me->n_copies);
		atomic64_add(c->len, &me->copied_bytes);
	}
	return ret;
}

long rsdrv_safecopy(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_safecopy c;

	if (copy_from_user(&c, uarg, sizeof(c)))
		return -EFAULT;
	return rsdrv_copy_one(ep, &c);
}

long rsdrv_vsafecopy(struct rsdrv_ep *ep, void __user *uarg)
{
	struct rsdrv_vsafecopy req;
	struct rsdrv_safecopy *copies;
	u32 done = 0;
	long ret = 0;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.count == 0 || req.count > RSDRV_MAX_COPY_BATCH)
		return -EINVAL;
	copies = memdup_user(u64_to_user_ptr(req.copies),
			     (size_t)req.count * sizeof(*copies));
	if (IS_ERR(copies))
		return PTR_ERR(copies);
	/* In order; stop at the first failure and report how many were done. */
	while (done < req.count && !ret) {
		ret = rsdrv_copy_one(ep, &copies[done]);
		if (!ret)
			done++;
	}
	kfree(copies);
	if (put_user(done, &((struct rsdrv_vsafecopy __user *)uarg)->done))
		return -EFAULT;
	return ret;
}
