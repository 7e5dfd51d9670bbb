# cython: language_level=3, boundscheck=False, wraparound=False
"""The console's hot path compiled: bytes from the pty -> pyte's screen.

pyte (pure Python) spends most of a flood of text in Screen.draw, one
namedtuple per character, and in its parser coroutine, one resumption per
carriage return and line feed.  These are the same operations, with the same
results cell for cell (tests/vm/test_console.py feeds pyte and these the same
bytes and compares every cell, cursor and dirty line): printable ASCII takes a
compiled loop with one shared Char per (attributes, character), the basic
controls in the parser's ground state call the screen directly, and
everything else (escape sequences, wide and combining characters, other
charsets' glyphs) goes through pyte's own code.
"""

import unicodedata

from pyte import modes as mo
from pyte.screens import wcwidth

# pyte's basic controls that the parser, in its ground state, hands straight to
# the screen (Stream.basic); SI and SO are left to it (it ignores them in UTF-8).
cdef dict GROUND_CONTROLS = {"\x07": "bell", "\x08": "backspace", "\x09": "tab", "\x0a": "linefeed",
                             "\x0b": "linefeed", "\x0c": "linefeed", "\x0d": "carriage_return"}


cdef list _ascii_glyphs(screen, attrs):
    """The cache of Chars for these attributes: one per ASCII code, made on first use.
    Kept on the screen with the attributes object it belongs to (pyte replaces
    cursor.attrs whenever the rendition changes, never mutates it)."""
    if getattr(screen, "_glyph_attrs", None) is not attrs:
        screen._glyph_attrs = attrs
        screen._glyphs = [None] * 128
    return screen._glyphs


def draw(screen, str data):
    """pyte.Screen.draw(screen, data), printable ASCII compiled."""
    cdef Py_ssize_t columns = screen.columns
    cdef Py_ssize_t x, width, code
    cdef Py_UCS4 ch
    cdef list glyphs
    cdef bint insert = mo.IRM in screen.mode
    cdef bint autowrap = mo.DECAWM in screen.mode
    data = data.translate(screen.g1_charset if screen.charset else screen.g0_charset)
    buffer = screen.buffer
    dirty = screen.dirty
    cursor = screen.cursor
    attrs = cursor.attrs
    glyphs = _ascii_glyphs(screen, attrs)
    x = cursor.x
    line = buffer[cursor.y]
    for ch in data:
        code = ch
        if 0x20 <= code < 0x7f:
            if x == columns:
                if autowrap:
                    dirty.add(cursor.y)
                    cursor.x = x
                    screen.carriage_return()
                    screen.linefeed()
                    x = cursor.x
                    line = buffer[cursor.y]
                else:
                    x -= 1
            if insert:
                cursor.x = x
                screen.insert_characters(1)
                line = buffer[cursor.y]
            glyph = glyphs[code]
            if glyph is None:
                glyph = glyphs[code] = attrs._replace(data=chr(code))
            line[x] = glyph
            x = x + 1 if x < columns else columns
            continue
        # Anything else: pyte's loop body for this one character, as it is.
        cursor.x = x
        width = wcwidth(ch)
        if cursor.x == columns:
            if autowrap:
                dirty.add(cursor.y)
                screen.carriage_return()
                screen.linefeed()
            elif width > 0:
                cursor.x -= width
        if insert and width > 0:
            screen.insert_characters(width)
        line = buffer[cursor.y]
        if width == 1:
            line[cursor.x] = attrs._replace(data=chr(ch))
        elif width == 2:
            line[cursor.x] = attrs._replace(data=chr(ch))
            if cursor.x + 1 < columns:
                line[cursor.x + 1] = attrs._replace(data="")
        elif width == 0 and unicodedata.combining(chr(ch)):
            if cursor.x:
                last = line[cursor.x - 1]
                line[cursor.x - 1] = last._replace(data=unicodedata.normalize("NFC", last.data + chr(ch)))
            elif cursor.y:
                last = buffer[cursor.y - 1][columns - 1]
                buffer[cursor.y - 1][columns - 1] = last._replace(
                    data=unicodedata.normalize("NFC", last.data + chr(ch)))
        else:
            x = cursor.x
            break       # unprintable, or does not advance the cursor: pyte drops the rest
        if width > 0:
            cursor.x = min(cursor.x + width, columns)
        x = cursor.x
    cursor.x = x
    dirty.add(cursor.y)


def feed(stream, bytes data):
    """pyte.ByteStream.feed(stream, data), the parser's ground state compiled."""
    cdef Py_ssize_t offset = 0, length
    cdef bint plain
    if stream.use_utf8:
        text = stream.utf8_decoder.decode(data)
    else:
        text = "".join(map(chr, data))
    listener = stream.listener
    if listener is None:
        raise RuntimeError("Listener is not set")
    send = stream._send_to_parser
    match_text = stream._text_pattern.match
    draw_text = listener.draw
    plain = stream._taking_plain_text
    length = len(text)
    while offset < length:
        if plain:
            match = match_text(text, offset)
            if match is not None:
                start, offset = match.span()
                draw_text(text[start:offset])
                continue
            control = GROUND_CONTROLS.get(text[offset])
            if control is not None:
                getattr(listener, control)()
                offset += 1
                continue
            plain = False
        else:
            plain = send(text[offset:offset + 1])
            offset += 1
    stream._taking_plain_text = plain


# id(Char) -> (Char, cell): the cell of a Char by identity, not by hashing its nine
# fields; the entry keeps the Char alive, so its id is not reused while cached.
cdef dict _cells_by_id = {}
cdef Py_ssize_t MAX_CACHED_CELLS = 16384


def render_row(screen, Py_ssize_t y, cell_of):
    """One screen line as VGA cells, bytes of (character, attribute) pairs: what
    b"".join(cell_of(line[x]) for each column) gives."""
    cdef Py_ssize_t x, columns = screen.columns
    cdef bytearray out = bytearray(2 * columns)
    cdef tuple entry
    cdef bytes cell
    line = screen.buffer[y]
    for x in range(columns):
        ch = line[x]
        entry = _cells_by_id.get(id(ch))
        if entry is None or entry[0] is not ch:
            cell = cell_of(ch)
            if len(_cells_by_id) >= MAX_CACHED_CELLS:
                _cells_by_id.clear()
            _cells_by_id[id(ch)] = (ch, cell)
        else:
            cell = entry[1]
        out[2 * x] = cell[0]
        out[2 * x + 1] = cell[1]
    return bytes(out)
