"""Stop strings: end the text before the first stop string, never emitting part of one.

Text that could still turn into a stop string (a suffix that is a prefix of one) is held back until
the next tokens decide it.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: tuple[str, ...]):
        self._stop = tuple(s for s in stop if s)
        self._pending = ""  # text received but not yet released
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add newly decoded text; return the part safe to emit. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        if not self._stop:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            released, self._pending = self._pending[:cut], ""
            return released
        hold = self._partial_match_length(self._pending)
        released = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(released) :]
        return released

    def flush(self) -> str:
        """At the end of generation, the held-back text is not a stop string after all."""
        released, self._pending = ("" if self.stopped else self._pending), ""
        return released

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
