# Declarations of kmod/include/uapi/rsdrv.h, the one header the module and
# libdrv share: ioctl numbers and layouts come from the C header itself.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t

cdef extern from "rsdrv.h":
    int RSDRV_API_VERSION
    int RSDRV_LABEL_MAX
    int RSDRV_MAX_PIO_BATCH
    int RSDRV_MAX_COPY_BATCH
    unsigned long long RSDRV_MAX_GRANT_LEN
    unsigned long long RSDRV_MAX_DMA_BUF
    unsigned long long RSDRV_DMA_MMAP_BASE

    int RSDRV_INFO_SEALED
    int RSDRV_INFO_DMA
    int RSDRV_PIO_IN
    int RSDRV_PIO_OUT
    int RSDRV_GRANT_READ
    int RSDRV_GRANT_WRITE
    int RSDRV_COPY_FROM_GRANT
    int RSDRV_COPY_TO_GRANT

    struct rsdrv_label:
        char label[32]
        uint64_t generation
    struct rsdrv_io_range:
        uint32_t base
        uint32_t count
    struct rsdrv_mem_range:
        uint64_t phys
        uint64_t size
    struct rsdrv_pci:
        uint32_t domain
        uint32_t bus
        uint32_t devfn
        uint32_t reserved
    struct rsdrv_peer:
        char label[32]
    struct rsdrv_info:
        char label[32]
        uint64_t generation
        uint32_t flags
        uint32_t api_version
    struct rsdrv_pio:
        uint16_t port
        uint8_t width
        uint8_t dir
        uint32_t value
    struct rsdrv_vpio:
        uint64_t ops
        uint32_t count
        uint32_t reserved
    struct rsdrv_irq_bind:
        uint32_t irq
        int32_t eventfd
    struct rsdrv_grant:
        uint64_t addr
        uint64_t len
        uint32_t access
        uint32_t id
        char grantee[32]
    struct rsdrv_safecopy:
        char granter[32]
        uint64_t granter_gen
        uint32_t grant_id
        uint32_t dir
        uint64_t offset
        uint64_t addr
        uint64_t len
    struct rsdrv_vsafecopy:
        uint64_t copies
        uint32_t count
        uint32_t done
    struct rsdrv_dma:
        uint64_t size
        uint64_t bus_addr
        uint64_t mmap_offset
        uint32_t id
        uint32_t reserved

    unsigned long RSDRV_IOC_SET_LABEL
    unsigned long RSDRV_IOC_ALLOW_IO
    unsigned long RSDRV_IOC_ALLOW_IRQ
    unsigned long RSDRV_IOC_ALLOW_MEM
    unsigned long RSDRV_IOC_ALLOW_PCI
    unsigned long RSDRV_IOC_ALLOW_GRANT_TO
    unsigned long RSDRV_IOC_SEAL
    unsigned long RSDRV_IOC_INFO
    unsigned long RSDRV_IOC_PIO
    unsigned long RSDRV_IOC_VPIO
    unsigned long RSDRV_IOC_IRQ_BIND
    unsigned long RSDRV_IOC_IRQ_REENABLE
    unsigned long RSDRV_IOC_IRQ_UNBIND
    unsigned long RSDRV_IOC_GRANT
    unsigned long RSDRV_IOC_REVOKE
    unsigned long RSDRV_IOC_SAFECOPY
    unsigned long RSDRV_IOC_VSAFECOPY
    unsigned long RSDRV_IOC_DMA_ALLOC
