// SPDX-License-Identifier: GPL-2.0
/*
 * Test helper for tests/vm/test_console.py: takes the kernel's "keyboard"
 * placeholders for ports 0x60 and 0x64 out of the I/O port tree while loaded,
 * so that /dev/rsdrv can reserve them for the user-mode i8042 driver; puts
 * them back on unload.
 *
 * x86 registers these at boot for the legacy PC (arch/x86/kernel/setup.c,
 * standard_io_resources) as busy resources no driver holds: the module's
 * request_region is refused with EBUSY while they are there.  What this does
 * belongs in rsdrv itself (a takeover of such a placeholder when rsd asks for
 * the range); until then the test stands in for it.  Only with
 * i8042.nokbd i8042.noaux, where no kernel driver uses the ports.
 */
#include <linux/ioport.h>
#include <linux/module.h>
#include <linux/string.h>

#define MAX_TAKEN 4

static struct resource *taken[MAX_TAKEN];
static int ntaken;

static bool is_keyboard_placeholder(const struct resource *r)
{
	return r->name && !strcmp(r->name, "keyboard") && r->start == r->end &&
	       (r->start == 0x60 || r->start == 0x64) && !r->child;
}

static int __init console_legacy_ports_init(void)
{
	struct resource *top, *r, *next;

	for (top = ioport_resource.child; top; top = top->sibling) {
		for (r = top->child; r; r = next) {
			next = r->sibling;
			if (is_keyboard_placeholder(r) && ntaken < MAX_TAKEN) {
				if (release_resource(r) == 0)
					taken[ntaken++] = r;
			}
		}
	}
	pr_info("console_legacy_ports: took %d keyboard placeholder(s) out of the I/O port tree\n", ntaken);
	return ntaken ? 0 : -ENOENT;
}

static void __exit console_legacy_ports_exit(void)
{
	int i;

	for (i = 0; i < ntaken; i++)
		if (insert_resource(&ioport_resource, taken[i]))
			pr_warn("console_legacy_ports: could not put back %pR (still reserved by someone)\n",
				taken[i]);
}

module_init(console_legacy_ports_init);
module_exit(console_legacy_ports_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("test helper: free the x86 keyboard port placeholders for a user-mode i8042 driver");
