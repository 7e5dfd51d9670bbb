// SPDX-License-Identifier: GPL-2.0
/*
 * rsdrv_fuzz (user space, not part of the module): random ioctls and mmaps on endpoints.
 * usage: rsdrv_fuzz SEED ITERATIONS FD...   (run it unprivileged; prints a summary)
 *        rsdrv_fuzz SEED ITERATIONS --setup PROCS
 *          (as root: open and seal endpoints like the guest test does, drop to
 *          uid/gid 65534, then fuzz from PROCS processes at once, sharing them)
 *
 * Half the calls use a real rsdrv command with a buffer of random bytes (with
 * fields nudged towards valid values now and then), a quarter a real command
 * with a NULL/wild pointer or mangled size bits, a quarter a random number.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <grp.h>
#include <unistd.h>
#include "rsdrv.h"

static uint64_t rng_state;

static uint64_t rnd(void)
{
	/* xorshift64*: fast, reproducible from the seed */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 2685821657736338717ULL;
}

static const unsigned long cmds[] = {
	RSDRV_IOC_SET_LABEL, RSDRV_IOC_ALLOW_IO, RSDRV_IOC_ALLOW_IRQ, RSDRV_IOC_ALLOW_MEM,
	RSDRV_IOC_ALLOW_PCI, RSDRV_IOC_ALLOW_GRANT_TO, RSDRV_IOC_SEAL, RSDRV_IOC_INFO,
	RSDRV_IOC_PIO, RSDRV_IOC_VPIO, RSDRV_IOC_IRQ_BIND, RSDRV_IOC_IRQ_REENABLE,
	RSDRV_IOC_IRQ_UNBIND, RSDRV_IOC_GRANT, RSDRV_IOC_REVOKE, RSDRV_IOC_SAFECOPY,
	RSDRV_IOC_VSAFECOPY, RSDRV_IOC_DMA_ALLOC,
};
#define NCMDS (sizeof(cmds) / sizeof(cmds[0]))

static unsigned char arena[1 << 16] __attribute__((aligned(4096)));

/* Make some fields plausible so the checks past the first ones are reached. */
static void nudge(unsigned long cmd, unsigned char *buf, int efd, const char *label)
{
	switch (cmd) {
	case RSDRV_IOC_PIO: {
		struct rsdrv_pio *p = (void *)buf;
		p->port = 0x2f8 + rnd() % 8;
		p->width = 1 << (rnd() % 3);
		p->dir = rnd() % 2;
		p->value &= 0xff;
		if (p->dir == RSDRV_PIO_OUT && p->port == 0x2f9)
			p->value &= 0x0d;	/* keep IER's THR-empty source off: no storm */
		break;
	}
	case RSDRV_IOC_VPIO: {
		struct rsdrv_vpio *v = (void *)buf;
		struct rsdrv_pio *ops = (void *)(arena + 8192);
		unsigned int i;

		v->count = rnd() % 70;
		v->reserved = rnd() % 8 ? 0 : v->reserved;
		v->ops = (uintptr_t)ops;
		for (i = 0; i < 70; i++) {
			ops[i].port = 0x2f8 + rnd() % 8;
			ops[i].width = 1;
			ops[i].dir = RSDRV_PIO_IN;
		}
		break;
	}
	case RSDRV_IOC_IRQ_BIND: {
		struct rsdrv_irq_bind *b = (void *)buf;
		b->irq = rnd() % 2 ? 3 : rnd() % 24;
		b->eventfd = rnd() % 2 ? efd : (int)(rnd() % 16);
		break;
	}
	case RSDRV_IOC_IRQ_REENABLE:
	case RSDRV_IOC_IRQ_UNBIND:
	case RSDRV_IOC_REVOKE:
		*(uint32_t *)buf = rnd() % 2 ? 3 : rnd() % 8;
		break;
	case RSDRV_IOC_GRANT: {
		struct rsdrv_grant *g = (void *)buf;
		g->addr = (uintptr_t)arena + rnd() % sizeof(arena);
		g->len = rnd() % 9000;
		g->access = rnd() % 4;
		strcpy(g->grantee, label);
		break;
	}
	case RSDRV_IOC_SAFECOPY: {
		struct rsdrv_safecopy *c = (void *)buf;
		strcpy(c->granter, label);
		c->granter_gen = rnd() % 64;
		c->grant_id = rnd() % 8;
		c->dir = rnd() % 2;
		c->offset = rnd() % 9000;
		c->addr = (uintptr_t)arena + rnd() % sizeof(arena);
		c->len = rnd() % 9000;
		break;
	}
	case RSDRV_IOC_DMA_ALLOC: {
		struct rsdrv_dma *d = (void *)buf;
		d->size = rnd() % (64 << 10);
		d->reserved = 0;
		break;
	}
	default:
		break;
	}
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* Root's part: the endpoints a driver would get, then no privileges at all. */
static int setup(int *fds)
{
	static const struct { const char *label; int privs; const char *peers[2]; } eps[] = {
		{ "fuzzA", 1, { "fuzzA", "fuzzB" } },
		{ "fuzzB", 0, { "fuzzA", NULL } },
	};
	struct rsdrv_io_range io = { .base = 0x2f8, .count = 8 };
	struct rsdrv_mem_range mem = { .phys = 0xb8000, .size = 0x8000 };
	struct rsdrv_pci pci = { .domain = 0, .bus = 0, .devfn = 2 << 3 };
	uint32_t irq = 3;
	unsigned int e, p;

	for (e = 0; e < 2; e++) {
		struct rsdrv_label l = { .generation = 0 };
		int fd = open("/dev/rsdrv", O_RDWR);

		if (fd < 0)
			die("open /dev/rsdrv");
		strcpy(l.label, eps[e].label);
		if (ioctl(fd, RSDRV_IOC_SET_LABEL, &l))
			die("set label");
		if (eps[e].privs && (ioctl(fd, RSDRV_IOC_ALLOW_IO, &io) ||
				     ioctl(fd, RSDRV_IOC_ALLOW_IRQ, &irq) ||
				     ioctl(fd, RSDRV_IOC_ALLOW_MEM, &mem) ||
				     ioctl(fd, RSDRV_IOC_ALLOW_PCI, &pci)))
			die("allow");
		for (p = 0; p < 2 && eps[e].peers[p]; p++) {
			struct rsdrv_peer peer = { { 0 } };

			strcpy(peer.label, eps[e].peers[p]);
			if (ioctl(fd, RSDRV_IOC_ALLOW_GRANT_TO, &peer))
				die("allow grant");
		}
		if (ioctl(fd, RSDRV_IOC_SEAL))
			die("seal");
		fds[e] = fd;
	}
	fds[2] = open("/dev/rsdrv", O_RDWR);	/* unsealed */
	if (fds[2] < 0)
		die("open /dev/rsdrv");
	if (setgroups(0, NULL) || setgid(65534) || setuid(65534))
		die("drop to nobody");
	return 3;
}

int main(int argc, char **argv)
{
	unsigned char buf[512] __attribute__((aligned(8)));
	long i, iterations, ok = 0, failed = 0, maps = 0;
	long errs[256] = { 0 };
	int fds[16], nfds = 0, efd, j, procs = 1, proc = 0;

	if (argc < 4) {
		fprintf(stderr, "usage: %s SEED ITERATIONS FD... | --setup PROCS\n", argv[0]);
		return 2;
	}
	rng_state = strtoull(argv[1], NULL, 0) | 1;
	iterations = strtol(argv[2], NULL, 0);
	if (!strcmp(argv[3], "--setup")) {
		nfds = setup(fds);
		procs = argc > 4 ? atoi(argv[4]) : 1;
		if (procs < 1 || procs > 64)
			procs = 1;
		for (proc = 0; proc < procs - 1; proc++)
			if (fork() == 0)
				break;	/* children fuzz too, each from its own seed */
		rng_state += 0x9e3779b97f4a7c15ULL * proc;
		iterations /= procs;
	} else {
		for (j = 3; j < argc && nfds < 16; j++)
			fds[nfds++] = atoi(argv[j]);
	}
	if (geteuid() == 0 || getuid() == 0)
		fprintf(stderr, "warning: fuzzing as root\n");
	efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

	for (i = 0; i < iterations; i++) {
		int fd = fds[rnd() % nfds];
		unsigned long cmd;
		void *arg = buf;
		unsigned int kind = rnd() % 4;
		long rc;
		size_t k;

		for (k = 0; k < sizeof(buf); k += 8)
			*(uint64_t *)(buf + k) = rnd();
		if (kind <= 1) {
			cmd = cmds[rnd() % NCMDS];
			if (rnd() % 2)
				nudge(cmd, buf, efd, rnd() % 2 ? "fuzzA" : "fuzzB");
		} else if (kind == 2) {
			cmd = cmds[rnd() % NCMDS];
			switch (rnd() % 4) {
			case 0: arg = NULL; break;
			case 1: arg = (void *)(uintptr_t)rnd(); break;
			case 2: arg = (void *)(uintptr_t)(0xffff800000000000ULL + rnd() % (1 << 30)); break;
			default: cmd ^= 1UL << (16 + rnd() % 14); break;	/* size/dir bits */
			}
		} else {
			cmd = (unsigned long)(uint32_t)rnd();
			if (rnd() % 2)
				cmd = (cmd & ~0xff00UL) | (RSDRV_IOC_MAGIC << 8);
		}
		rc = ioctl(fd, cmd, arg);
		if (rc < 0) {
			failed++;
			errs[errno & 0xff]++;
		} else {
			ok++;
		}
		if (rnd() % 512 == 0) {	/* now and then, a random mmap */
			size_t len = 4096 * (1 + rnd() % 4);
			off_t off = rnd() % 2 ? (off_t)((rnd() % 0x100000) & ~0xfffULL)
					     : (off_t)(RSDRV_DMA_MMAP_BASE + (rnd() % 4) * RSDRV_DMA_MMAP_STRIDE);
			void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
				       rnd() % 8 ? MAP_SHARED : MAP_PRIVATE, fd, off);
			if (p != MAP_FAILED) {
				maps++;
				((volatile char *)p)[0];
				munmap(p, len);
			}
		}
	}
	if (proc < procs - 1)
		_exit(0);	/* a child: the last process reports */
	while (procs > 1 && wait(NULL) > 0)
		;
	printf("procs %d calls %ld ok %ld failed %ld maps %ld (last process)\n", procs,
	       iterations, ok, failed, maps);
	for (j = 0; j < 256; j++)
		if (errs[j])
			printf("errno %d (%s): %ld\n", j, strerror(j), errs[j]);
	return 0;
}
