"""The 8042 keyboard controller and the PS/2 keyboard's commands, named as in the
IBM PS/2 technical reference (controller) and the keyboard's command set."""

DATA = 0x60                  # read: output buffer; write: to the keyboard (or a command's argument)
STATUS = 0x64                # read: status register
COMMAND = 0x64               # write: controller command

# status register
STATUS_OBF = 0x01            # output buffer full: a byte waits at DATA
STATUS_IBF = 0x02            # input buffer full: do not write yet
STATUS_SYS = 0x04            # system flag (set after a passed self-test)
STATUS_CMD = 0x08            # last write was to COMMAND
STATUS_AUX_OBF = 0x20        # the byte at DATA is from the auxiliary (mouse) port
STATUS_TIMEOUT = 0x40
STATUS_PARITY = 0x80

# controller commands
CMD_READ_CONFIG = 0x20       # the configuration byte ("command byte") -> DATA
CMD_WRITE_CONFIG = 0x60      # next byte at DATA becomes it
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_SELF_TEST = 0xAA         # -> SELF_TEST_PASSED
CMD_KBD_TEST = 0xAB          # keyboard interface test -> KBD_TEST_PASSED
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE

SELF_TEST_PASSED = 0x55
KBD_TEST_PASSED = 0x00

# configuration byte
CONFIG_KBD_INT = 0x01        # IRQ 1 when a keyboard byte arrives
CONFIG_AUX_INT = 0x02        # IRQ 12 for the aux port
CONFIG_SYS = 0x04
CONFIG_KBD_DISABLE = 0x10    # keyboard clock off
CONFIG_AUX_DISABLE = 0x20
CONFIG_TRANSLATE = 0x40      # the controller translates set 2 to set 1

# keyboard commands (written to DATA) and its answers
KBD_SET_LEDS = 0xED          # argument: LED_* bits
KBD_ECHO = 0xEE
KBD_SCANCODE_SET = 0xF0      # argument 0: report the set; 1, 2, 3: select
KBD_ENABLE = 0xF4            # start scanning
KBD_DISABLE = 0xF5
KBD_RESET = 0xFF             # -> ACK, then BAT_OK
KBD_ACK = 0xFA
KBD_RESEND = 0xFE
KBD_BAT_OK = 0xAA            # basic assurance test passed (after reset or power-up)
KBD_OVERRUN = (0x00, 0xFF)   # key detection error / buffer overrun

LED_SCROLL = 0x01
LED_NUM = 0x02
LED_CAPS = 0x04
