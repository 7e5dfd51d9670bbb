/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * rsdrv: the user/kernel interface of /dev/rsdrv.
 *
 * One header for the module (C) and libdrv (Cython, libdrv/rsdrv.pxd), so
 * the ioctl numbers and structure layouts cannot drift apart.  Every
 * structure has fixed-size fields and explicit padding: identical on
 * 32- and 64-bit user space, no compat layer needed.
 */
#ifndef _UAPI_RSDRV_H
#define _UAPI_RSDRV_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define RSDRV_API_VERSION	1
#define RSDRV_IOC_MAGIC		0xE5

/* Limits: each one is checked at the ioctl boundary. */
#define RSDRV_LABEL_MAX		32	/* bytes including the NUL */
#define RSDRV_MAX_IO_RANGES	16
#define RSDRV_MAX_IRQS		8
#define RSDRV_MAX_MEM_RANGES	8
#define RSDRV_MAX_PEERS		16
#define RSDRV_MAX_PIO_BATCH	1024
#define RSDRV_MAX_COPY_BATCH	64
#define RSDRV_MAX_GRANTS	4096
#define RSDRV_MAX_GRANT_LEN	(1ULL << 30)
#define RSDRV_MAX_DMA_BUF	(4ULL << 20)
#define RSDRV_MAX_DMA_TOTAL	(64ULL << 20)

/* mmap offsets at or above this name DMA buffers; below, physical addresses. */
#define RSDRV_DMA_MMAP_BASE	(1ULL << 56)
#define RSDRV_DMA_MMAP_STRIDE	(1ULL << 32)

/* Privilege set-up (CAP_SYS_RAWIO, before RSDRV_IOC_SEAL). */
struct rsdrv_label {
	char label[RSDRV_LABEL_MAX];	/* NUL-terminated, [A-Za-z0-9_.-]+ */
	__u64 generation;		/* in: 0 = module picks; out: in force */
};

struct rsdrv_io_range {
	__u32 base;			/* first port */
	__u32 count;			/* number of ports; base + count <= 0x10000 */
};

struct rsdrv_mem_range {
	__u64 phys;			/* page aligned */
	__u64 size;			/* page aligned, > 0 */
};

struct rsdrv_pci {
	__u32 domain;
	__u32 bus;			/* 0..255 */
	__u32 devfn;			/* (slot << 3) | function, 0..255 */
	__u32 reserved;			/* must be 0 */
};

struct rsdrv_peer {
	char label[RSDRV_LABEL_MAX];
};

/* What an endpoint is (any holder of the file may ask). */
#define RSDRV_INFO_SEALED	0x1
#define RSDRV_INFO_DMA		0x2	/* has a PCI device for DMA buffers */

struct rsdrv_info {
	char label[RSDRV_LABEL_MAX];
	__u64 generation;
	__u32 flags;
	__u32 api_version;
};

/* DEVIO: one port access.  width 1, 2 or 4; value in for OUT, out for IN. */
#define RSDRV_PIO_IN		0
#define RSDRV_PIO_OUT		1

struct rsdrv_pio {
	__u16 port;
	__u8 width;
	__u8 dir;
	__u32 value;
};

/* VDEVIO: a batch, done in order; ops is a user pointer to count entries. */
struct rsdrv_vpio {
	__u64 ops;
	__u32 count;			/* 1..RSDRV_MAX_PIO_BATCH */
	__u32 reserved;			/* must be 0 */
};

/* IRQ: bind a line to an eventfd; the handler masks the line and signals. */
struct rsdrv_irq_bind {
	__u32 irq;
	__s32 eventfd;
};

/* Copy grants. */
#define RSDRV_GRANT_READ	0x1	/* grantee may copy from the region */
#define RSDRV_GRANT_WRITE	0x2	/* grantee may copy into the region */

struct rsdrv_grant {
	__u64 addr;			/* granter's own address */
	__u64 len;			/* 1..RSDRV_MAX_GRANT_LEN */
	__u32 access;			/* RSDRV_GRANT_READ | RSDRV_GRANT_WRITE */
	__u32 id;			/* out */
	char grantee[RSDRV_LABEL_MAX];
};

#define RSDRV_COPY_FROM_GRANT	0	/* granter's region -> my buffer */
#define RSDRV_COPY_TO_GRANT	1	/* my buffer -> granter's region */

struct rsdrv_safecopy {
	char granter[RSDRV_LABEL_MAX];
	__u64 granter_gen;
	__u32 grant_id;
	__u32 dir;
	__u64 offset;			/* into the grant */
	__u64 addr;			/* my buffer */
	__u64 len;
};

struct rsdrv_vsafecopy {
	__u64 copies;			/* user pointer to count rsdrv_safecopy */
	__u32 count;			/* 1..RSDRV_MAX_COPY_BATCH */
	__u32 done;			/* out: copies completed */
};

/* DMA buffers for the endpoint's PCI device (no IOMMU isolation). */
struct rsdrv_dma {
	__u64 size;			/* in: 1..RSDRV_MAX_DMA_BUF, rounded up to pages */
	__u64 bus_addr;			/* out: address the device uses */
	__u64 mmap_offset;		/* out: pass to mmap() on this file */
	__u32 id;			/* out */
	__u32 reserved;
};

#define RSDRV_IOC_SET_LABEL	_IOWR(RSDRV_IOC_MAGIC, 0x01, struct rsdrv_label)
#define RSDRV_IOC_ALLOW_IO	_IOW(RSDRV_IOC_MAGIC, 0x02, struct rsdrv_io_range)
#define RSDRV_IOC_ALLOW_IRQ	_IOW(RSDRV_IOC_MAGIC, 0x03, __u32)
#define RSDRV_IOC_ALLOW_MEM	_IOW(RSDRV_IOC_MAGIC, 0x04, struct rsdrv_mem_range)
#define RSDRV_IOC_ALLOW_PCI	_IOW(RSDRV_IOC_MAGIC, 0x05, struct rsdrv_pci)
#define RSDRV_IOC_ALLOW_GRANT_TO _IOW(RSDRV_IOC_MAGIC, 0x06, struct rsdrv_peer)
#define RSDRV_IOC_SEAL		_IO(RSDRV_IOC_MAGIC, 0x07)
#define RSDRV_IOC_INFO		_IOR(RSDRV_IOC_MAGIC, 0x08, struct rsdrv_info)

#define RSDRV_IOC_PIO		_IOWR(RSDRV_IOC_MAGIC, 0x10, struct rsdrv_pio)
#define RSDRV_IOC_VPIO		_IOW(RSDRV_IOC_MAGIC, 0x11, struct rsdrv_vpio)

#define RSDRV_IOC_IRQ_BIND	_IOW(RSDRV_IOC_MAGIC, 0x20, struct rsdrv_irq_bind)
#define RSDRV_IOC_IRQ_REENABLE	_IOW(RSDRV_IOC_MAGIC, 0x21, __u32)
#define RSDRV_IOC_IRQ_UNBIND	_IOW(RSDRV_IOC_MAGIC, 0x22, __u32)

#define RSDRV_IOC_GRANT		_IOWR(RSDRV_IOC_MAGIC, 0x30, struct rsdrv_grant)
#define RSDRV_IOC_REVOKE	_IOW(RSDRV_IOC_MAGIC, 0x31, __u32)
#define RSDRV_IOC_SAFECOPY	_IOW(RSDRV_IOC_MAGIC, 0x32, struct rsdrv_safecopy)
#define RSDRV_IOC_VSAFECOPY	_IOWR(RSDRV_IOC_MAGIC, 0x33, struct rsdrv_vsafecopy)

#define RSDRV_IOC_DMA_ALLOC	_IOWR(RSDRV_IOC_MAGIC, 0x40, struct rsdrv_dma)

/*
 * Errors with a fixed meaning (libdrv maps each to an exception):
 *   EPERM    caller lacks CAP_SYS_RAWIO, entry sealed, or resource not in the
 *            entry (port, IRQ, memory, grant peer); also: grant not for you
 *            (safecopy only)
 *   EBADFD   endpoint not sealed yet (no label/privileges in force)
 *   ESRCH    safecopy: granter dead (exited, closed, or never existed)
 *   ESTALE   safecopy: granter restarted (label alive with a new generation)
 *   ENOENT   safecopy/revoke: no such grant (revoked or never made)
 *   EACCES   safecopy: grant does not allow this direction
 *   ERANGE   safecopy: offset/length outside the grant
 *   EBUSY    IRQ line in use (rsdrv never shares a line)
 *   ENOSPC   a table is full (ranges, grants, IRQs, DMA budget)
 */

#endif /* _UAPI_RSDRV_H */
