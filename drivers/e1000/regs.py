"""Intel 8254x (82540EM) registers, bits and descriptor layouts.

From Intel's "PCI/PCI-X Family of Gigabit Ethernet Controllers Software
Developer's Manual" (8254x, rev. 4.0): section 13 (registers) and 3.2/3.3
(receive and transmit descriptors).  Offsets are into BAR 0.
"""

# -- general (13.4.1 ..) -------------------------------------------------------------------
CTRL = 0x0000
STATUS = 0x0008
EECD = 0x0010
EERD = 0x0014
CTRL_EXT = 0x0018
MDIC = 0x0020
FCAL, FCAH, FCT = 0x0028, 0x002C, 0x0030
VET = 0x0038
FCTTV = 0x0170
PBA = 0x1000

CTRL_FD = 1 << 0          # full duplex
CTRL_LRST = 1 << 3        # link reset
CTRL_ASDE = 1 << 5        # auto-speed detection
CTRL_SLU = 1 << 6         # set link up
CTRL_ILOS = 1 << 7        # invert loss-of-signal
CTRL_SPD_MASK = 3 << 8
CTRL_FRCSPD = 1 << 11
CTRL_FRCDPX = 1 << 12
CTRL_RST = 1 << 26        # device reset, self-clearing; the 82540EM's PHY is not reset by it
CTRL_RFCE = 1 << 27
CTRL_TFCE = 1 << 28
CTRL_VME = 1 << 30
CTRL_PHY_RST = 1 << 31

STATUS_FD = 1 << 0
STATUS_LU = 1 << 1
STATUS_TXOFF = 1 << 4
STATUS_SPEED_SHIFT = 6
STATUS_SPEED_MASK = 3 << 6
SPEEDS = {0: 10, 1: 100, 2: 1000, 3: 1000}   # STATUS.SPEED

EECD_SK, EECD_CS, EECD_DI, EECD_DO = 1 << 0, 1 << 1, 1 << 2, 1 << 3
EECD_REQ, EECD_GNT, EECD_PRES = 1 << 6, 1 << 7, 1 << 8

EERD_START = 1 << 0
EERD_DONE = 1 << 4
EERD_ADDR_SHIFT = 8
EERD_DATA_SHIFT = 16
EEPROM_MAC_WORDS = (0, 1, 2)      # words 0..2: the Ethernet address, little-endian

# -- interrupts (13.4.17 ..) -----------------------------------------------------------------
ICR = 0x00C0
ITR = 0x00C4
ICS = 0x00C8
IMS = 0x00D0
IMC = 0x00D8

ICR_TXDW = 1 << 0         # a descriptor with RS was written back
ICR_TXQE = 1 << 1         # transmit queue empty
ICR_LSC = 1 << 2          # link status change
ICR_RXSEQ = 1 << 3
ICR_RXDMT0 = 1 << 4       # receive descriptors below the minimum threshold
ICR_RXO = 1 << 6          # receiver overrun
ICR_RXT0 = 1 << 7         # receiver timer: frames written back
ICR_MDAC = 1 << 9
ICR_RXCFG = 1 << 10
ICR_GPI = 0xF << 11
ICR_TXD_LOW = 1 << 15
ICR_SRPD = 1 << 16
IRQ_ALL = 0xFFFFFFFF

ITR_UNIT_NS = 256         # ITR interval unit; 1e9 / (rate * 256)
DELAY_UNIT_NS = 1024      # RDTR, RADV, TIDV, TADV unit

# -- receive (13.4.22 ..) --------------------------------------------------------------------
RCTL = 0x0100
FCRTL, FCRTH = 0x2160, 0x2168
RDBAL, RDBAH, RDLEN, RDH, RDT = 0x2800, 0x2804, 0x2808, 0x2810, 0x2818
RDTR = 0x2820
RXDCTL = 0x2828
RADV = 0x282C
RSRPD = 0x2C00
RXCSUM = 0x5000
MTA = 0x5200              # 128 registers: the multicast hash table
MTA_WORDS = 128
RAL0, RAH0 = 0x5400, 0x5404   # receive address 0 (16 pairs, 8 bytes apart)
RA_ENTRIES = 16
VFTA = 0x5600

RCTL_EN = 1 << 1
RCTL_SBP = 1 << 2         # store bad packets
RCTL_UPE = 1 << 3         # unicast promiscuous
RCTL_MPE = 1 << 4         # multicast promiscuous
RCTL_LPE = 1 << 5         # long packets: frames above 1522 bytes, spanning descriptors
RCTL_LBM_MASK = 3 << 6
RCTL_RDMTS_HALF = 0 << 8
RCTL_RDMTS_QUARTER = 1 << 8
RCTL_RDMTS_EIGHTH = 2 << 8
RCTL_MO_SHIFT = 12        # multicast offset: which 12 address bits hash into MTA (0: bits 47:36)
RCTL_BAM = 1 << 15        # accept broadcast
RCTL_BSIZE_2048 = 0 << 16
RCTL_BSIZE_1024 = 1 << 16
RCTL_BSIZE_512 = 2 << 16
RCTL_BSIZE_256 = 3 << 16
RCTL_VFE = 1 << 18
RCTL_CFIEN = 1 << 19
RCTL_CFI = 1 << 20
RCTL_DPF = 1 << 22
RCTL_PMCF = 1 << 23
RCTL_BSEX = 1 << 25
RCTL_SECRC = 1 << 26      # strip the Ethernet CRC

RXCSUM_PCSS_MASK = 0xFF
RXCSUM_IPOFL = 1 << 8     # IP header checksum offload
RXCSUM_TUOFL = 1 << 9     # TCP/UDP checksum offload

RAH_AV = 1 << 31          # address valid

# legacy receive descriptor (3.2.3): u64 addr | u16 length | u16 csum | u8 status | u8 errors | u16 special
RXD_SIZE = 16
RXD_STAT_DD = 1 << 0
RXD_STAT_EOP = 1 << 1
RXD_STAT_IXSM = 1 << 2    # ignore the checksum indications
RXD_STAT_VP = 1 << 3
RXD_STAT_TCPCS = 1 << 5   # TCP (or UDP) checksum calculated
RXD_STAT_IPCS = 1 << 6    # IP checksum calculated
RXD_STAT_PIF = 1 << 7
RXD_ERR_CE = 1 << 0       # CRC or alignment error
RXD_ERR_SE = 1 << 1       # symbol error
RXD_ERR_SEQ = 1 << 2      # sequence error
RXD_ERR_CXE = 1 << 4      # carrier extension error
RXD_ERR_TCPE = 1 << 5     # TCP/UDP checksum error
RXD_ERR_IPE = 1 << 6      # IP checksum error
RXD_ERR_RXE = 1 << 7      # RX data error
RXD_ERR_FRAME = RXD_ERR_CE | RXD_ERR_SE | RXD_ERR_SEQ | RXD_ERR_CXE | RXD_ERR_RXE

# -- transmit (13.4.33 ..) -------------------------------------------------------------------
TCTL = 0x0400
TIPG = 0x0410
AIFS = 0x0458
TDBAL, TDBAH, TDLEN, TDH, TDT = 0x3800, 0x3804, 0x3808, 0x3810, 0x3818
TIDV = 0x3820
TXDCTL = 0x3828
TADV = 0x382C
TSPMT = 0x3830

TCTL_EN = 1 << 1
TCTL_PSP = 1 << 3         # pad short packets
TCTL_CT_SHIFT = 4         # collision threshold
TCTL_COLD_SHIFT = 12      # collision distance
TCTL_SWXOFF = 1 << 22
TCTL_RTLC = 1 << 24
TCTL_CT_DEFAULT = 0x0F
TCTL_COLD_FULL_DUPLEX = 0x40

TIPG_IPGT_COPPER = 10     # 13.4.34: IPGT 10, IPGR1 8, IPGR2 6 for 802.3 copper
TIPG_IPGR1_SHIFT, TIPG_IPGR1 = 10, 8
TIPG_IPGR2_SHIFT, TIPG_IPGR2 = 20, 6

# Transmit descriptors (3.3), 16 bytes, all three kinds:
#   legacy   u64 addr | u16 length | u8 cso | u8 cmd | u8 sta | u8 css | u16 special
#   context  u8 ipcss | u8 ipcso | u16 ipcse | u8 tucss | u8 tucso | u16 tucse
#            | u32 (paylen:20 dtyp:4 tucmd:8) | u8 sta | u8 hdrlen | u16 mss
#   data     u64 addr | u32 (length:20 dtyp:4 dcmd:8) | u8 sta | u8 popts | u16 special
# The command bits below are as they sit in the descriptor's second dword (bits 24..31).
TXD_SIZE = 16
TXD_CMD_EOP = 1 << 24     # end of packet
TXD_CMD_IFCS = 1 << 25    # insert the FCS
TXD_CMD_IC = 1 << 26      # legacy: insert checksum
TXD_CMD_TSE = 1 << 26     # data/context: TCP segmentation enable
TXD_CMD_RS = 1 << 27      # report status: write DD back
TXD_CMD_RPS = 1 << 28
TXD_CMD_DEXT = 1 << 29    # extended (context/data) descriptor
TXD_CMD_VLE = 1 << 30
TXD_CMD_IDE = 1 << 31     # interrupt delay (TIDV) enable
TXD_CMD_TCP = 1 << 24     # context TUCMD: the L4 protocol is TCP
TXD_CMD_IP = 1 << 25      # context TUCMD: IPv4 (else IPv6)
TXD_DTYP_C = 0 << 20      # context descriptor
TXD_DTYP_D = 1 << 20      # data descriptor
TXD_LENGTH_MASK = 0xFFFFF # data descriptor length / context PAYLEN
TXD_STAT_DD = 1 << 0      # in the descriptor's byte 12
TXD_POPTS_IXSM = 1 << 0   # insert the IP checksum (byte 13)
TXD_POPTS_TXSM = 1 << 1   # insert the TCP/UDP checksum
TXD_MAX_DATA = 4096       # bytes per data descriptor (what Intel's drivers use on every 8254x)

# -- statistics (13.7): clear on read; the 64-bit ones read low then high ---------------------
CRCERRS, ALGNERRC, SYMERRS, RXERRC, MPC = 0x4000, 0x4004, 0x4008, 0x400C, 0x4010
SCC, ECOL, MCC, LATECOL, COLC, DC = 0x4014, 0x4018, 0x401C, 0x4020, 0x4028, 0x4030
TNCRS, SEC, CEXTERR, RLEC = 0x4034, 0x4038, 0x403C, 0x4040
XONRXC, XONTXC, XOFFRXC, XOFFTXC, FCRUC = 0x4048, 0x404C, 0x4050, 0x4054, 0x4058
PRC64, PRC127, PRC255, PRC511, PRC1023, PRC1522 = 0x405C, 0x4060, 0x4064, 0x4068, 0x406C, 0x4070
GPRC, BPRC, MPRC, GPTC = 0x4074, 0x4078, 0x407C, 0x4080
GORCL, GORCH, GOTCL, GOTCH = 0x4088, 0x408C, 0x4090, 0x4094
RNBC, RUC, RFC, ROC, RJC = 0x40A0, 0x40A4, 0x40A8, 0x40AC, 0x40B0
MGTPRC, MGTPDC, MGTPTC = 0x40B4, 0x40B8, 0x40BC
TORL, TORH, TOTL, TOTH = 0x40C0, 0x40C4, 0x40C8, 0x40CC
TPR, TPT = 0x40D0, 0x40D4
PTC64, PTC127, PTC255, PTC511, PTC1023, PTC1522 = 0x40D8, 0x40DC, 0x40E0, 0x40E4, 0x40E8, 0x40EC
MPTC, BPTC, TSCTC, TSCTFC = 0x40F0, 0x40F4, 0x40F8, 0x40FC

# name -> register: what `stats` reports (32-bit counters)
STATS32 = {
    "crc_errors": CRCERRS, "alignment_errors": ALGNERRC, "symbol_errors": SYMERRS,
    "rx_errors": RXERRC, "missed_packets": MPC, "single_collisions": SCC,
    "collisions": COLC, "rx_no_buffers": RNBC, "rx_undersize": RUC, "rx_oversize": ROC,
    "rx_good_packets": GPRC, "rx_broadcast": BPRC, "rx_multicast": MPRC,
    "tx_good_packets": GPTC, "rx_total_packets": TPR, "tx_total_packets": TPT,
    "tx_multicast": MPTC, "tx_broadcast": BPTC, "tso_contexts": TSCTC,
}
# name -> (low, high) register pairs (64-bit octet counters; reading high clears both)
STATS64 = {"rx_good_octets": (GORCL, GORCH), "tx_good_octets": (GOTCL, GOTCH),
           "rx_total_octets": (TORL, TORH), "tx_total_octets": (TOTL, TOTH)}

# -- the 82540EM's limits ----------------------------------------------------------------------
MAX_JUMBO_FRAME = 16110   # what Intel's e1000 driver allows (MAX_JUMBO_FRAME_SIZE)
ETH_OVERHEAD = 18         # header + FCS: MTU = frame - 18
STANDARD_MTU = 1500
