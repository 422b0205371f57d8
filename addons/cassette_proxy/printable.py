"""Text from the outside (file names above all) made safe for a header or a log line.

A cassette's file name is whatever the folder holds: a CR/LF in it would end a response
header (``X-Cassette-File: x`` then ``Set-Cookie: ...`` on the wire) or start a forged
log line. Every control character is shown escaped instead, as Python writes it.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the lone
# surrogates a file name's non-UTF-8 bytes become (no header or log can encode them).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with every control character escaped (``\\r``, ``\\n``, ``\\x1b`` ...);
    text without one is returned as it is."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda m: repr(m.group(0))[1:-1], text)
