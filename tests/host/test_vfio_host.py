"""VFIO pieces that need no device: the service-file keys, the ABI's numbers and layouts
against the kernel's uapi header, and what a driver without VFIO fds is told.  The device
itself is driven in tests/vm/test_vfio.py."""

import ctypes
import os
import shutil
import subprocess

import pytest

from libdrv import vfio_abi as abi
from libdrv.vfio import VfioDevice
from rsd import vfio as rsd_vfio
from rsd.service import ConfigError, load_file

HEADER = "/usr/include/linux/vfio.h"
STRUCTS = ("vfio_info_cap_header", "vfio_group_status", "vfio_device_info", "vfio_region_info",
           "vfio_irq_info", "vfio_irq_set", "vfio_iommu_type1_info", "vfio_iova_range",
           "vfio_iommu_type1_info_cap_iova_range", "vfio_iommu_type1_info_dma_avail",
           "vfio_iommu_type1_dma_map", "vfio_iommu_type1_dma_unmap")
IOCTLS = ("VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_SET_IOMMU", "VFIO_GROUP_GET_STATUS",
          "VFIO_GROUP_SET_CONTAINER", "VFIO_GROUP_UNSET_CONTAINER", "VFIO_GROUP_GET_DEVICE_FD",
          "VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_GET_REGION_INFO", "VFIO_DEVICE_GET_IRQ_INFO",
          "VFIO_DEVICE_SET_IRQS", "VFIO_DEVICE_RESET", "VFIO_IOMMU_GET_INFO", "VFIO_IOMMU_MAP_DMA",
          "VFIO_IOMMU_UNMAP_DMA", "VFIO_TYPE1v2_IOMMU", "VFIO_DMA_UNMAP_FLAG_ALL",
          "VFIO_PCI_CONFIG_REGION_INDEX", "VFIO_PCI_INTX_IRQ_INDEX", "VFIO_IRQ_SET_ACTION_UNMASK")


def write(tmp_path, text, name="eth0"):
    path = tmp_path / (name + ".toml")
    path.write_text(text)
    return str(path)


def test_take_from_kernel_is_read_with_the_device(tmp_path):
    spec = load_file(write(tmp_path, 'program = "x.y"\n[resources]\npci = ["8086:100e"]\n'
                                     'take_from_kernel = true\n'))
    assert spec.resources.take_from_kernel is True
    assert spec.resources.to_dict()["take_from_kernel"] is True
    spec = load_file(write(tmp_path, 'program = "x.y"\n[resources]\npci = ["0000:00:02.0"]\n'))
    assert spec.resources.take_from_kernel is False
    assert "take_from_kernel" not in spec.resources.to_dict()


@pytest.mark.parametrize("text, line, message", [
    ('program = "x.y"\n[resources]\ntake_from_kernel = true\n', 3, "only means something with a pci device"),
    ('program = "x.y"\n[resources]\npci = ["8086:100e"]\ntake_from_kernel = "yes"\n', 4, "must be true or false"),
    ('program = "x.y"\n[resources]\npci = ["8086:100e"]\ntake_from_kernel = 1\n', 4, "must be true or false"),
])
def test_take_from_kernel_errors_name_the_line_and_say_what_to_do(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_file(path)
    assert e.value.line == line and e.value.key == "resources.take_from_kernel"
    assert message in str(e.value) and str(e.value).startswith("%s:%d:" % (path, line))


def test_struct_layouts_and_numbers_match_the_kernel_header(tmp_path):
    assert os.path.exists(HEADER), "%s missing: apt-get install linux-libc-dev" % HEADER
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "no C compiler to read the uapi header with: apt-get install gcc"
    src = tmp_path / "abi.c"
    src.write_text("#include <stdio.h>\n#include <linux/vfio.h>\nint main(void) {\n"
                   + "".join('printf("%s %%zu\\n", sizeof(struct %s));\n' % (s, s) for s in STRUCTS)
                   + "".join('printf("%s %%lu\\n", (unsigned long)(%s));\n' % (n, n) for n in IOCTLS)
                   + "return 0; }\n")
    exe = tmp_path / "abi"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    got = dict(line.split() for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                       text=True).stdout.splitlines())
    for s in STRUCTS:
        assert ctypes.sizeof(getattr(abi, s)) == int(got[s]), s
    for n in IOCTLS:
        assert getattr(abi, n) == int(got[n]), n
    # field offsets as the header lays them out (data[] of vfio_irq_set starts at its size, 20)
    assert abi.vfio_region_info.size.offset == 16 and abi.vfio_region_info.offset.offset == 24
    assert abi.vfio_iommu_type1_dma_map.vaddr.offset == 8


def test_argsz_is_the_structs_own_size():
    assert abi.vfio_region_info.new(index=7).argsz == 32
    assert abi.vfio_iommu_type1_dma_map.new().argsz == 32


def test_a_driver_without_vfio_fds_is_told_where_they_come_from():
    with pytest.raises(OSError) as e:
        VfioDevice.inherited({"RSD_RESOURCE_FDS": "rsdrv=5"})
    assert "[resources] pci" in str(e.value) and "rsdrv" in str(e.value)


def test_a_device_without_an_iommu_group_is_not_taken_by_vfio(tmp_path):
    dev = tmp_path / "0000:00:02.0"
    dev.mkdir()
    assert rsd_vfio.iommu_group("0000:00:02.0", str(tmp_path)) is None
    os.symlink("../../kernel/iommu_groups/7", dev / "iommu_group")
    assert rsd_vfio.iommu_group("0000:00:02.0", str(tmp_path)) == 7
    assert rsd_vfio.current_driver("0000:00:02.0", str(tmp_path)) is None
