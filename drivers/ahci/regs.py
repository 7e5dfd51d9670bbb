"""AHCI 1.3.1 register and FIS names, and the ATA8-ACS commands and IDENTIFY words the driver uses.

Sources: Serial ATA AHCI 1.3.1 (section 3: HBA and port registers; 4.2:
command list, received FIS, command table, PRD; 10.1.2 port start/stop;
6.2.2 error recovery), ATA8-ACS (commands and the IDENTIFY DEVICE words),
SATA 3.x section 10.5 (FIS layouts).  The data path (_port.pyx) repeats the
few it needs as compile-time constants.
"""

# -- HBA (generic host control), offsets into ABAR (BAR 5) ----------------------------------------
ABAR_INDEX = 5
CAP = 0x00          # capabilities
GHC = 0x04          # global host control
IS = 0x08           # interrupt status, one bit per port
PI = 0x0C           # ports implemented
VS = 0x10           # version
CAP2 = 0x24

CAP_NP_MASK = 0x1F              # ports - 1
CAP_NCS_SHIFT, CAP_NCS_MASK = 8, 0x1F   # command slots - 1
CAP_SCLO = 1 << 24              # command list override
CAP_SSS = 1 << 27               # staggered spin-up
CAP_SNCQ = 1 << 30              # native command queuing
CAP_S64A = 1 << 31              # 64-bit addressing

GHC_HR = 1 << 0                 # HBA reset (self-clearing)
GHC_IE = 1 << 1                 # interrupt enable
GHC_AE = 1 << 31                # AHCI enable

# -- port registers: PORT_BASE + port * PORT_SIZE + ... ----------------------------------------------
PORT_BASE = 0x100
PORT_SIZE = 0x80
PxCLB = 0x00
PxCLBU = 0x04
PxFB = 0x08
PxFBU = 0x0C
PxIS = 0x10
PxIE = 0x14
PxCMD = 0x18
PxTFD = 0x20
PxSIG = 0x24
PxSSTS = 0x28
PxSCTL = 0x2C
PxSERR = 0x30
PxSACT = 0x34
PxCI = 0x38

# PxIS / PxIE
IS_DHRS = 1 << 0                # D2H register FIS received
IS_PSS = 1 << 1                 # PIO setup FIS received
IS_DSS = 1 << 2                 # DMA setup FIS received
IS_SDBS = 1 << 3                # set device bits FIS received (NCQ completions)
IS_UFS = 1 << 4
IS_DPS = 1 << 5                 # a PRD with I set was processed
IS_PCS = 1 << 6                 # port connect change
IS_PRCS = 1 << 22               # PhyRdy change
IS_OFS = 1 << 24                # overflow
IS_INFS = 1 << 26               # interface non-fatal error
IS_IFS = 1 << 27                # interface fatal error
IS_HBDS = 1 << 28               # host bus data error
IS_HBFS = 1 << 29               # host bus fatal error (e.g. a DMA the IOMMU refused)
IS_TFES = 1 << 30               # task file error: the device reported an error
IS_ERRORS = IS_OFS | IS_IFS | IS_HBDS | IS_HBFS | IS_TFES
IS_COMPLETION = IS_DHRS | IS_PSS | IS_DSS | IS_SDBS | IS_DPS
IE_ENABLED = IS_COMPLETION | IS_ERRORS | IS_INFS | IS_PCS | IS_PRCS

# PxCMD
CMD_ST = 1 << 0                 # start: process the command list
CMD_SUD = 1 << 1                # spin-up device
CMD_POD = 1 << 2                # power on device
CMD_CLO = 1 << 3                # command list override (clears BSY/DRQ)
CMD_FRE = 1 << 4                # FIS receive enable
CMD_CCS_SHIFT, CMD_CCS_MASK = 8, 0x1F
CMD_FR = 1 << 14                # FIS receive running
CMD_CR = 1 << 15                # command list running
CMD_ICC_SHIFT = 28
CMD_ICC_ACTIVE = 1 << CMD_ICC_SHIFT

# PxTFD
TFD_STS_ERR = 1 << 0
TFD_STS_DRQ = 1 << 3
TFD_STS_BSY = 1 << 7
TFD_ERR_SHIFT = 8

# PxSSTS / PxSCTL
SSTS_DET_MASK = 0xF
SSTS_DET_PRESENT = 3            # device present, PHY communication established
SSTS_SPD_SHIFT = 4
SCTL_DET_MASK = 0xF
SCTL_DET_COMRESET = 1
SCTL_IPM_NO_PARTIAL_SLUMBER = 3 << 8

SIG_ATA = 0x00000101            # PxSIG of an ATA disk (ATAPI: 0xEB140101)

# -- memory structures -------------------------------------------------------------------------------------
SLOTS_MAX = 32
CMD_HEADER_SIZE = 32            # x 32 slots: the command list, 1 KiB aligned
CMD_LIST_SIZE = SLOTS_MAX * CMD_HEADER_SIZE
RFIS_SIZE = 256                 # received FIS area, 256-byte aligned
RFIS_D2H_OFF = 0x40             # the D2H register FIS within it
CMD_TABLE_CFIS = 0x00           # command table: command FIS (64 bytes)
CMD_TABLE_PRDT = 0x80           # then the PRD table, 16 bytes an entry; the table is 128-byte aligned
PRD_SIZE = 16
PRD_MAX_BYTES = 4 << 20         # one PRD entry moves at most 4 MiB (DBC is 22 bits)

# command header DW0
CH_CFL_H2D = 5                  # a register H2D FIS is 5 dwords
CH_WRITE = 1 << 6
CH_PRDTL_SHIFT = 16

# -- FIS -------------------------------------------------------------------------------------------------------
FIS_TYPE_REG_H2D = 0x27
FIS_TYPE_REG_D2H = 0x34
FIS_H2D_COMMAND = 0x80          # byte 1: C, this FIS carries a command
DEVICE_LBA = 1 << 6
DEVICE_FUA = 1 << 7             # NCQ: forced unit access

# -- ATA commands (ATA8-ACS) ----------------------------------------------------------------------------------
ATA_IDENTIFY_DEVICE = 0xEC
ATA_READ_DMA_EXT = 0x25
ATA_WRITE_DMA_EXT = 0x35
ATA_WRITE_DMA_FUA_EXT = 0x3D
ATA_READ_FPDMA_QUEUED = 0x60
ATA_WRITE_FPDMA_QUEUED = 0x61
ATA_FLUSH_CACHE_EXT = 0xEA
ATA_DATA_SET_MANAGEMENT = 0x06
ATA_DSM_TRIM = 0x01             # features bit 0
ATA_READ_LOG_EXT = 0x2F
ATA_LOG_NCQ_ERROR = 0x10        # NCQ command error log: byte 0 bits 4:0 the tag, bit 7 NQ
DSM_RANGES_PER_BLOCK = 64       # 8-byte entries in a 512-byte block: LBA 47:0, count 63:48
DSM_RANGE_MAX = 0xFFFF

ATA_ERR_ABRT = 1 << 2
ATA_ERR_IDNF = 1 << 4
ATA_ERR_UNC = 1 << 6

# -- IDENTIFY DEVICE words --------------------------------------------------------------------------------
ID_SERIAL = (10, 10)            # (first word, words): ATA strings, byte-swapped per word
ID_FIRMWARE = (23, 4)
ID_MODEL = (27, 20)
ID_LBA28 = 60                   # 60-61
ID_QUEUE_DEPTH = 75             # bits 4:0: depth - 1
ID_SATA_CAP = 76                # bit 8: NCQ
ID_SATA_CAP_NCQ = 1 << 8
ID_CMDSET_82 = 82               # bit 5: volatile write cache
ID_CMDSET_83 = 83               # bit 10: 48-bit addresses
ID_CMDSET_84 = 84               # bit 6: WRITE DMA FUA EXT
ID_CMDSET_85 = 85               # bit 5: write cache enabled
ID_LBA48 = 100                  # 100-103
ID_DSM_MAX_BLOCKS = 105         # 512-byte blocks of DSM ranges one command takes
ID_SECTOR_SIZE = 106            # bit 14 valid, 13 several logical per physical (2^bits 3:0), 12 long logical
ID_LOGICAL_SIZE = 117           # 117-118: logical sector size in words
ID_DSM = 169                    # bit 0: TRIM
ID_ROTATION = 217               # 1: non-rotating
ID_WCACHE_SUPPORTED = 1 << 5
ID_WCACHE_ENABLED = 1 << 5
ID_LBA48_SUPPORTED = 1 << 10
ID_FUA_EXT = 1 << 6
ID_SECTOR_VALID = 1 << 14
ID_SECTOR_MULTI = 1 << 13
ID_SECTOR_LONG = 1 << 12
ID_DSM_TRIM = 1 << 0
