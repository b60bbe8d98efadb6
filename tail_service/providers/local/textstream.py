"""Turn generated token bytes into safe-to-emit text: incremental UTF-8 and stop strings.

A byte-level BPE token can end in the middle of a multi-byte UTF-8 character, and a stop
string can span several tokens. :class:`TextAssembler` therefore holds back (a) bytes
that do not yet form a whole character and (b) a trailing piece of text that could still
grow into a stop string. Text it has returned is final: it never contains a stop string
and is never retracted, so it can be streamed to a client as is.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    """Incremental decoder for one choice.

    ``stops``: stop strings (empty ones are ignored). After a stop string is seen,
    :attr:`stopped` is true, the text before it has been returned, and the stop string
    and everything after it are dropped. :attr:`text` is all text returned so far.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.text = ""
        self.stopped = False

    @property
    def char_offset(self) -> int:
        """Characters decoded so far (returned + held back): where the next token's text starts."""
        return len(self.text) + len(self._pending)

    def _release(self, final: bool) -> str:
        pending = self._pending
        if self._stops:
            hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
            if hits:
                self.stopped = True
                self._pending = ""
                out = pending[: min(hits)]
                self.text += out
                return out
        hold = 0
        if not final:
            for stop in self._stops:
                for k in range(min(len(stop) - 1, len(pending)), hold, -1):
                    if pending.endswith(stop[:k]):
                        hold = k
                        break
        cut = len(pending) - hold
        out, self._pending = pending[:cut], pending[cut:]
        self.text += out
        return out

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that became final (may be ``""``)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush held-back text (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)
