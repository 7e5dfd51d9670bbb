"""A program nobody here wrote drives /dev/ttyRSD1: pyserial (Debian's python3-serial, run by
/usr/bin/python3) sets 7E1 through tcsetattr, drives DTR and RTS, reads CTS and DSR, and moves
data, with the UART in loopback (TIOCMBIS TIOCM_LOOP: pyserial has no call for it).  Prints JSON."""

import fcntl
import json
import struct
import sys
import time

import serial

TIOCMBIS, TIOCMBIC, TIOCM_LOOP = 0x5416, 0x5417, 0x8000

s = serial.Serial(sys.argv[1], baudrate=19200, bytesize=serial.SEVENBITS, parity=serial.PARITY_EVEN,
                  stopbits=serial.STOPBITS_ONE, timeout=3)
fcntl.ioctl(s.fileno(), TIOCMBIS, struct.pack("i", TIOCM_LOOP))
res = {"version": serial.__version__}
s.rts, s.dtr = True, False
time.sleep(0.1)
res["rts_on_cts"], res["dtr_off_dsr"] = s.cts, s.dsr
s.rts, s.dtr = False, True
time.sleep(0.1)
res["rts_off_cts"], res["dtr_on_dsr"] = s.cts, s.dsr
s.reset_input_buffer()
s.write(b"pyserial 7E1\n")
s.flush()                                   # tcdrain
time.sleep(0.2)
res["in_waiting"] = s.in_waiting
res["read"] = s.read(13).decode(errors="replace")
res["read_timeout_empty"] = s.read(1).decode()   # nothing more: the timeout (select) ends it
s.send_break(0.1)
fcntl.ioctl(s.fileno(), TIOCMBIC, struct.pack("i", TIOCM_LOOP))
s.close()
print(json.dumps(res))
