"""Scancode sets 1 and 2 of the PS/2 keyboard: make codes -> key names.

Key names are QEMU's qcodes (what `sendkey` takes), so a test names a key the
same way on both sides.  Set 1 is what the controller delivers with translation
on (the PC default); set 2 is the keyboard's own, seen with translation off.
"""

EXTENDED = 0xE0              # prefix: the next code is from the extended table
PAUSE = 0xE1                 # prefix of the Pause key's sequence (make only, no break)
SET1_BREAK = 0x80            # set 1: break code = make code | 0x80
SET2_BREAK = 0xF0            # set 2: prefix of a break code
PAUSE_SET1 = bytes([0xE1, 0x1D, 0x45, 0xE1, 0x9D, 0xC5])
PAUSE_SET2 = bytes([0xE1, 0x14, 0x77, 0xE1, 0xF0, 0x14, 0xF0, 0x77])

_SET1_ROWS = (
    (0x01, ["esc", "1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "minus", "equal", "backspace",
            "tab", "q", "w", "e", "r", "t", "y", "u", "i", "o", "p", "bracket_left", "bracket_right",
            "ret", "ctrl", "a", "s", "d", "f", "g", "h", "j", "k", "l", "semicolon", "apostrophe",
            "grave_accent", "shift", "backslash", "z", "x", "c", "v", "b", "n", "m", "comma", "dot",
            "slash", "shift_r", "kp_multiply", "alt", "spc", "caps_lock", "f1", "f2", "f3", "f4", "f5",
            "f6", "f7", "f8", "f9", "f10", "num_lock", "scroll_lock", "kp_7", "kp_8", "kp_9",
            "kp_subtract", "kp_4", "kp_5", "kp_6", "kp_add", "kp_1", "kp_2", "kp_3", "kp_0",
            "kp_decimal"]),
    (0x56, ["less", "f11", "f12"]),
)
SET1 = {}
for _first, _names in _SET1_ROWS:
    for _i, _name in enumerate(_names):
        SET1[_first + _i] = _name

SET1_EXTENDED = {
    0x1C: "kp_enter", 0x1D: "ctrl_r", 0x35: "kp_divide", 0x37: "print", 0x38: "alt_r",
    0x47: "home", 0x48: "up", 0x49: "pgup", 0x4B: "left", 0x4D: "right", 0x4F: "end",
    0x50: "down", 0x51: "pgdn", 0x52: "insert", 0x53: "delete", 0x5B: "meta_l", 0x5C: "meta_r",
    0x5D: "menu",
}

SET2 = {
    0x76: "esc", 0x16: "1", 0x1E: "2", 0x26: "3", 0x25: "4", 0x2E: "5", 0x36: "6", 0x3D: "7",
    0x3E: "8", 0x46: "9", 0x45: "0", 0x4E: "minus", 0x55: "equal", 0x66: "backspace", 0x0D: "tab",
    0x15: "q", 0x1D: "w", 0x24: "e", 0x2D: "r", 0x2C: "t", 0x35: "y", 0x3C: "u", 0x43: "i",
    0x44: "o", 0x4D: "p", 0x54: "bracket_left", 0x5B: "bracket_right", 0x5A: "ret", 0x14: "ctrl",
    0x1C: "a", 0x1B: "s", 0x23: "d", 0x2B: "f", 0x34: "g", 0x33: "h", 0x3B: "j", 0x42: "k",
    0x4B: "l", 0x4C: "semicolon", 0x52: "apostrophe", 0x0E: "grave_accent", 0x12: "shift",
    0x5D: "backslash", 0x1A: "z", 0x22: "x", 0x21: "c", 0x2A: "v", 0x32: "b", 0x31: "n",
    0x3A: "m", 0x41: "comma", 0x49: "dot", 0x4A: "slash", 0x59: "shift_r", 0x7C: "kp_multiply",
    0x11: "alt", 0x29: "spc", 0x58: "caps_lock", 0x05: "f1", 0x06: "f2", 0x04: "f3", 0x0C: "f4",
    0x03: "f5", 0x0B: "f6", 0x83: "f7", 0x0A: "f8", 0x01: "f9", 0x09: "f10", 0x78: "f11",
    0x07: "f12", 0x77: "num_lock", 0x7E: "scroll_lock", 0x6C: "kp_7", 0x75: "kp_8", 0x7D: "kp_9",
    0x7B: "kp_subtract", 0x6B: "kp_4", 0x73: "kp_5", 0x74: "kp_6", 0x79: "kp_add", 0x69: "kp_1",
    0x72: "kp_2", 0x7A: "kp_3", 0x70: "kp_0", 0x71: "kp_decimal", 0x61: "less",
}

SET2_EXTENDED = {
    0x5A: "kp_enter", 0x14: "ctrl_r", 0x4A: "kp_divide", 0x7C: "print", 0x11: "alt_r",
    0x6C: "home", 0x75: "up", 0x7D: "pgup", 0x6B: "left", 0x74: "right", 0x69: "end",
    0x72: "down", 0x7A: "pgdn", 0x70: "insert", 0x71: "delete", 0x1F: "meta_l", 0x27: "meta_r",
    0x2F: "menu",
}

# The extended shift codes that some keys (Print Screen, the cursor block with
# Num Lock on) wrap themselves in: not key presses.
FAKE_SHIFTS_SET1 = (0x2A, 0x36)
FAKE_SHIFTS_SET2 = (0x12, 0x59)

MODIFIER_KEYS = {"shift": "shift", "shift_r": "shift", "ctrl": "ctrl", "ctrl_r": "ctrl",
                 "alt": "alt", "alt_r": "alt"}
LOCK_KEYS = {"caps_lock": "caps", "num_lock": "num", "scroll_lock": "scroll"}


class Decoder:
    """Bytes from the keyboard -> (key name or None, down) in order.

    A code not in the tables gives (None, down) with the code counted in
    `unknown`, so a strange keyboard cannot make us guess."""

    def __init__(self, scancode_set):
        if scancode_set not in (1, 2):
            raise ValueError("scancode set must be 1 or 2, not %r" % (scancode_set,))
        self.set = scancode_set
        self.reset()
        self.unknown = 0

    def reset(self):
        """Forget a sequence half received (the keyboard or the driver restarted)."""
        self.extended = False
        self.breaking = False
        self.pause_left = 0

    @property
    def mid_sequence(self):
        return self.extended or self.breaking or self.pause_left > 0

    def feed(self, byte):
        """One byte; returns a (key, down) event or None while a sequence is incomplete."""
        if self.pause_left:
            self.pause_left -= 1
            return ("pause", True) if self.pause_left == 0 else None
        if byte == PAUSE:
            self.pause_left = len(PAUSE_SET1 if self.set == 1 else PAUSE_SET2) - 1
            return None
        if byte == EXTENDED:
            self.extended = True
            return None
        if self.set == 1:
            extended, self.extended = self.extended, False
            down = not byte & SET1_BREAK
            code = byte & ~SET1_BREAK
            if extended and code in FAKE_SHIFTS_SET1:
                return None
            table = SET1_EXTENDED if extended else SET1
        else:
            if byte == SET2_BREAK:
                self.breaking = True
                return None
            extended, self.extended = self.extended, False
            down, self.breaking = not self.breaking, False
            code = byte
            if extended and code in FAKE_SHIFTS_SET2:
                return None
            table = SET2_EXTENDED if extended else SET2
        key = table.get(code)
        if key is None:
            self.unknown += 1
        return key, down
