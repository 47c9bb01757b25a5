"""Server-sent events read from raw body chunks: the gateway's job stream without httpx-sse's layers.

Lines are split as httpx's `aiter_lines` splits them (`str.splitlines`, a `\\r\\n` split across two
chunks kept whole), and fields read as httpx-sse reads them, so the events are the same. Linear: a
line spread over many chunks is kept as pieces and joined once. Only `data` is kept (the gateway's
envelope is JSON in it); an event is dispatched at its blank line, never at the end of the stream.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator

_NEWLINES = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # what `str.splitlines` splits on


class Lines:
    """httpx's `LineDecoder`: text in, whole lines out."""

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._cr = False

    def feed(self, text: str) -> list[str]:
        if self._cr:
            text, self._cr = "\r" + text, False
        if text.endswith("\r"):  # maybe half of a `\r\n`: wait for the next chunk
            text, self._cr = text[:-1], True
        if not text:
            return []
        complete = text[-1] in _NEWLINES
        lines = text.splitlines()
        if len(lines) == 1 and not complete:
            self._pieces.append(lines[0])
            return []
        if self._pieces:
            lines[0] = "".join(self._pieces) + lines[0]
            self._pieces = []
        if not complete:
            self._pieces = [lines.pop()]
        return lines


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data` of each event in the stream (its `data:` lines joined by newlines)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    lines, data = Lines(), []
    async for chunk in chunks:
        for line in lines.feed(decoder.decode(chunk)):
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
                continue
            if line.startswith(":"):
                continue  # a comment (the gateway's keep-alives)
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value[1:] if value.startswith(" ") else value)
