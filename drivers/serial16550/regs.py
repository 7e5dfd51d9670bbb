"""16550A register map, from the National Semiconductor PC16550D datasheet.

Offsets are from the port base (COM1 0x3f8, COM2 0x2f8). Names follow the
datasheet so the driver reads like it.
"""

# Register offsets.  With LCR.DLAB = 1, offsets 0 and 1 are the divisor latch.
RBR = 0   # receiver buffer (read)
THR = 0   # transmitter holding (write)
DLL = 0   # divisor latch, low byte (DLAB = 1)
DLM = 1   # divisor latch, high byte (DLAB = 1)
IER = 1   # interrupt enable
IIR = 2   # interrupt identification (read)
FCR = 2   # FIFO control (write)
LCR = 3   # line control
MCR = 4   # modem control
LSR = 5   # line status
MSR = 6   # modem status
SCR = 7   # scratch
NPORTS = 8

# IER: interrupt enable
IER_ERBFI = 0x01   # received data available (and character timeout)
IER_ETBEI = 0x02   # transmitter holding register empty
IER_ELSI = 0x04    # receiver line status
IER_EDSSI = 0x08   # modem status

# IIR: interrupt identification
IIR_NO_INT = 0x01          # bit 0 set: nothing pending
IIR_ID_MASK = 0x0E
IIR_MODEM_STATUS = 0x00    # priority 4: CTS/DSR/RI/DCD changed; cleared by reading MSR
IIR_THR_EMPTY = 0x02       # priority 3: cleared by reading IIR or writing THR
IIR_RX_DATA = 0x04         # priority 2: cleared when RBR drops below the trigger
IIR_LINE_STATUS = 0x06     # priority 1: overrun/parity/framing/break; cleared by reading LSR
IIR_CHAR_TIMEOUT = 0x0C    # priority 2: data sat in the RX FIFO for 4 character times
IIR_FIFO_MASK = 0xC0       # both set: FIFOs enabled (16550A)

# FCR: FIFO control
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER_1 = 0x00
FCR_TRIGGER_4 = 0x40
FCR_TRIGGER_8 = 0x80
FCR_TRIGGER_14 = 0xC0
FIFO_SIZE = 16

# LCR: line control
LCR_WLS_MASK = 0x03        # word length: 0 -> 5 bits ... 3 -> 8 bits
LCR_STB = 0x04             # 2 stop bits (1.5 with 5-bit words)
LCR_PEN = 0x08             # parity enable
LCR_EPS = 0x10             # even parity select
LCR_STICK = 0x20           # stick parity (mark/space)
LCR_BREAK = 0x40           # set break
LCR_DLAB = 0x80            # divisor latch access

# MCR: modem control
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08            # on PCs, gates the UART's interrupt onto the bus
MCR_LOOP = 0x10            # local loopback
MCR_AFE = 0x20             # auto flow control (16750; ignored by a 16550A)

# LSR: line status
LSR_DR = 0x01              # data ready
LSR_OE = 0x02              # overrun error
LSR_PE = 0x04              # parity error
LSR_FE = 0x08              # framing error
LSR_BI = 0x10              # break interrupt
LSR_THRE = 0x20            # THR empty
LSR_TEMT = 0x40            # transmitter empty
LSR_RXFE = 0x80            # error in RX FIFO
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR: modem status
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

# In loopback, the modem outputs feed the inputs: RTS->CTS, DTR->DSR,
# OUT1->RI, OUT2->DCD.

BASE_CLOCK = 1843200       # Hz, the PC's UART crystal
BAUD_BASE = BASE_CLOCK // 16   # 115200: divisor = BAUD_BASE / baud
