"""VGA text mode: the CRT controller's registers and the text buffer's layout,
named as in the IBM VGA technical reference (CRTC registers 0x0A-0x0F)."""

TEXT_BASE = 0xB8000          # colour text mode buffer (physical)
TEXT_PAGE = 0x1000           # one 4 KiB page holds an 80x25 screen (4000 bytes)
COLS = 80
ROWS = 25
CELL = 2                     # bytes per cell: character (CP437), attribute

# CRT controller, colour emulation (the Miscellaneous Output register's I/OAS bit set)
CRTC_INDEX = 0x3D4
CRTC_DATA = 0x3D5

CRTC_CURSOR_START = 0x0A     # bits 0-4: first scan line; bit 5: cursor off
CRTC_CURSOR_END = 0x0B       # bits 0-4: last scan line
CRTC_START_HIGH = 0x0C       # start address (in cells), bits 8-15
CRTC_START_LOW = 0x0D        # start address, bits 0-7
CRTC_CURSOR_HIGH = 0x0E      # cursor location (in cells), bits 8-15
CRTC_CURSOR_LOW = 0x0F       # cursor location, bits 0-7

CURSOR_DISABLE = 0x20        # in CRTC_CURSOR_START
CURSOR_SCANLINE_MASK = 0x1F
CURSOR_FIRST_LINE = 14       # an underline cursor in the 16-line character cell
CURSOR_LAST_LINE = 15

# The attribute byte: bits 0-3 foreground, 4-6 background, 7 blink (or bright
# background when the attribute controller's blink bit is off).
ATTR_FG_MASK = 0x0F
ATTR_BG_SHIFT = 4
ATTR_BG_MASK = 0x70
ATTR_BLINK = 0x80
ATTR_DEFAULT = 0x07          # light grey on black

# The 16 colours of the default palette, by index
BLACK, BLUE, GREEN, CYAN, RED, MAGENTA, BROWN, LIGHT_GREY = range(8)
BRIGHT = 0x08                # foreground intensity bit
