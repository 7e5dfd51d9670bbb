// SPDX-License-Identifier: GPL-2.0
/*
 * rsdrv_bench (user space, not part of the module): rsdrv's costs, run as root in the guest.
 * usage: rsdrv_bench pio|vpio|direct|pioout|vpioout|directout|copy SIZE|memcpy SIZE|irq [N]
 * Prints one line: "<what> <ns per op or per access> <MB/s or -> ..."
 * pio/vpio/direct read COM2's scratch register (0x2ff); irq uses COM2's THR-empty
 * interrupt on IRQ 3 and prints latency percentiles in ns.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>
#include "rsdrv.h"

#define COM2 0x2f8
#define SCR (COM2 + 7)

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* hw: COM2's ports and IRQ, which only one endpoint at a time can hold. */
static int endpoint(const char *label, const char *peer, int hw)
{
	struct rsdrv_label l = { .generation = 0 };
	struct rsdrv_io_range io = { .base = COM2, .count = 8 };
	uint32_t irq = 3;
	int fd = open("/dev/rsdrv", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		die("open /dev/rsdrv");
	strncpy(l.label, label, sizeof(l.label) - 1);
	if (ioctl(fd, RSDRV_IOC_SET_LABEL, &l))
		die("set label");
	if (hw && (ioctl(fd, RSDRV_IOC_ALLOW_IO, &io) || ioctl(fd, RSDRV_IOC_ALLOW_IRQ, &irq)))
		die("set-up");
	if (peer) {
		struct rsdrv_peer p = { { 0 } };

		strncpy(p.label, peer, sizeof(p.label) - 1);
		if (ioctl(fd, RSDRV_IOC_ALLOW_GRANT_TO, &p))
			die("allow grant");
	}
	if (ioctl(fd, RSDRV_IOC_SEAL))
		die("seal");
	return fd;
}

static void pio_out(int fd, uint16_t port, uint32_t v)
{
	struct rsdrv_pio op = { .port = port, .width = 1, .dir = RSDRV_PIO_OUT, .value = v };

	if (ioctl(fd, RSDRV_IOC_PIO, &op))
		die("pio out");
}

static uint32_t pio_in(int fd, uint16_t port)
{
	struct rsdrv_pio op = { .port = port, .width = 1, .dir = RSDRV_PIO_IN };

	if (ioctl(fd, RSDRV_IOC_PIO, &op))
		die("pio in");
	return op.value;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	const char *what = argc > 1 ? argv[1] : "";
	long n, i;
	double t0, t1;

	if (!strcmp(what, "pio") || !strcmp(what, "vpio") || !strcmp(what, "direct") ||
	    !strcmp(what, "pioout") || !strcmp(what, "vpioout") || !strcmp(what, "directout")) {
		n = argc > 2 ? atol(argv[2]) : 100000;
		int fd = endpoint("bench", NULL, 1);
		int out = strstr(what, "out") != NULL;
		volatile uint32_t sink = 0;

		if (!strcmp(what, "pioout")) {
			t0 = now_ns();
			for (i = 0; i < n; i++)
				pio_out(fd, SCR, i & 0xff);
			t1 = now_ns();
		} else if (!strcmp(what, "directout")) {
			if (ioperm(COM2, 8, 1))
				die("ioperm");
			t0 = now_ns();
			for (i = 0; i < n; i++)
				outb(i & 0xff, SCR);
			t1 = now_ns();
		} else if (!strcmp(what, "pio")) {
			t0 = now_ns();
			for (i = 0; i < n; i++)
				sink += pio_in(fd, SCR);
			t1 = now_ns();
		} else if (!strcmp(what, "vpio") || !strcmp(what, "vpioout")) {
			struct rsdrv_pio ops[64];
			struct rsdrv_vpio v = { .ops = (uintptr_t)ops, .count = 64 };

			for (i = 0; i < 64; i++)
				ops[i] = (struct rsdrv_pio){ .port = SCR, .width = 1, .value = i,
							     .dir = out ? RSDRV_PIO_OUT : RSDRV_PIO_IN };
			t0 = now_ns();
			for (i = 0; i < n / 64; i++)
				if (ioctl(fd, RSDRV_IOC_VPIO, &v))
					die("vpio");
			t1 = now_ns();
			n = (n / 64) * 64;
		} else {
			if (ioperm(COM2, 8, 1))
				die("ioperm");
			t0 = now_ns();
			for (i = 0; i < n; i++)
				sink += inb(SCR);
			t1 = now_ns();
		}
		printf("%s %.1f\n", what, (t1 - t0) / n);
		return 0;
	}

	if (!strcmp(what, "memcpy") || !strcmp(what, "copy")) {
		size_t size = argc > 2 ? strtoul(argv[2], NULL, 0) : 4096;
		n = argc > 3 ? atol(argv[3]) : 2000;
		char *src = aligned_alloc(4096, size + 4096), *dst = aligned_alloc(4096, size + 4096);

		memset(src, 'g', size);
		memset(dst, 0, size);
		if (!strcmp(what, "memcpy")) {
			t0 = now_ns();
			for (i = 0; i < n; i++) {
				memcpy(dst, src, size);
				__asm__ volatile("" ::: "memory");
			}
			t1 = now_ns();
		} else {
			int granter = endpoint("bgranter", "bgrantee", 0);
			int grantee = endpoint("bgrantee", NULL, 0);
			int pipefd[2], go[2];
			struct rsdrv_info info;
			uint32_t id;
			pid_t pid;

			if (pipe(pipefd) || pipe(go) || ioctl(granter, RSDRV_IOC_INFO, &info))
				die("pipe/info");
			pid = fork();
			if (pid == 0) {	/* the granter: grant, report the id, wait */
				struct rsdrv_grant g = { .addr = (uintptr_t)src, .len = size,
							 .access = RSDRV_GRANT_READ };
				char c;

				strcpy(g.grantee, "bgrantee");
				if (ioctl(granter, RSDRV_IOC_GRANT, &g))
					die("grant");
				if (write(pipefd[1], &g.id, sizeof(g.id)) != sizeof(g.id))
					die("write");
				if (read(go[0], &c, 1) < 0)
					die("read");
				_exit(0);
			}
			if (read(pipefd[0], &id, sizeof(id)) != sizeof(id))
				die("read id");
			struct rsdrv_safecopy c = { .granter_gen = info.generation, .grant_id = id,
						    .dir = RSDRV_COPY_FROM_GRANT, .offset = 0,
						    .addr = (uintptr_t)dst, .len = size };
			strcpy(c.granter, "bgranter");
			t0 = now_ns();
			for (i = 0; i < n; i++)
				if (ioctl(grantee, RSDRV_IOC_SAFECOPY, &c))
					die("safecopy");
			t1 = now_ns();
			if (dst[size - 1] != 'g')
				die("copy content");
			if (write(go[1], "x", 1) != 1)
				die("write");
			waitpid(pid, NULL, 0);
		}
		printf("%s %zu %.1f %.1f\n", what, size, (t1 - t0) / n,
		       size * (double)n / ((t1 - t0) / 1e9) / 1e6);
		return 0;
	}

	if (!strcmp(what, "irq")) {
		n = argc > 2 ? atol(argv[2]) : 200;
		int fd = endpoint("birq", NULL, 1);
		int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		struct rsdrv_irq_bind b = { .irq = 3, .eventfd = efd };
		double *lat = calloc(n, sizeof(double));
		uint64_t cnt;

		if (ioctl(fd, RSDRV_IOC_IRQ_BIND, &b))
			die("irq bind");
		pio_out(fd, COM2 + 4, 0x08);
		for (i = 0; i < n; i++) {
			struct pollfd p = { .fd = efd, .events = POLLIN };
			uint32_t irq = 3;

			pio_out(fd, COM2 + 1, 0);
			t0 = now_ns();
			pio_out(fd, COM2 + 1, 0x02);	/* THR empty: interrupt now */
			if (poll(&p, 1, 2000) != 1)
				die("no interrupt within 2 s");
			t1 = now_ns();
			if (read(efd, &cnt, sizeof(cnt)) != sizeof(cnt))
				die("eventfd read");
			pio_in(fd, COM2 + 2);	/* IIR: acknowledge */
			pio_out(fd, COM2 + 1, 0);
			if (ioctl(fd, RSDRV_IOC_IRQ_REENABLE, &irq))
				die("reenable");
			lat[i] = t1 - t0;
		}
		pio_out(fd, COM2 + 4, 0);
		qsort(lat, n, sizeof(double), cmp_double);
		printf("irq %.1f %.1f %.1f\n", lat[n / 2], lat[n * 9 / 10], lat[n * 99 / 100]);
		return 0;
	}
	fprintf(stderr, "usage: %s pio|vpio|direct|copy SIZE|memcpy SIZE|irq [N]\n", argv[0]);
	return 2;
}
