"""One sequence's text as its tokens arrive, without torch: incremental detokenization and stop strings.

Detokenization keeps prefix/read offsets into the token ids (as TGI and vLLM do): each new piece is the decode of
the ids since `prefix_offset` minus the decode of those up to `read_offset`, and a piece that ends in an
incomplete character (U+FFFD) is held back until the character is whole. Stop strings are searched only in text
not searched before (a match may start up to one stop string's length earlier); a match cuts the text before it.
While a sequence has stop strings, a tail of its text that could still begin one is held back.
With `include_stop` the cut is after the match instead (vLLM's include_stop_str_in_output); with `min_tokens`
(vLLM's too), stop strings count only once `activate_stops` is called, and only from the text there on.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT_CHAR = "\ufffd"


class IncrementalText:
    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: tuple[str, ...] = (),
        include_stop: bool = False,
        stops_active: bool = True,
    ) -> None:
        """`decode(ids)` turns token ids into text; `stop` are the stop strings, kept in the text with
        `include_stop`; with `stops_active=False` they count only after `activate_stops()`."""
        self._decode = decode
        self.stop = stop
        self.include_stop = include_stop
        self.stops_active = stops_active
        self.stop_from = 0  # a match may start no earlier than this
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all accepted text so far (stop string excluded)
        self.emitted = 0  # chars of `text` already handed out
        self.checked = 0  # chars of `text` already searched for stop strings

    def add(self, ids: list[int]) -> None:
        """Append the new complete text of `ids` (all of the sequence's text tokens) since the last call."""
        if len(ids) <= self.read_offset:
            return
        prefix_text = self._decode(ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(ids)
            self.text += new_text[len(prefix_text):]

    def flush(self, ids: list[int]) -> None:
        """At the end: append the text of tokens still held back as an incomplete character (a trailing partial
        character is dropped). The flushed text may still complete a stop string."""
        if len(ids) > self.read_offset:
            prefix_text = self._decode(ids[self.prefix_offset:self.read_offset])
            new_text = self._decode(ids[self.prefix_offset:])
            self.text += new_text[len(prefix_text):].rstrip(REPLACEMENT_CHAR)
            self.prefix_offset = self.read_offset = len(ids)

    def activate_stops(self) -> None:
        """From now on stop strings count, matched in the text from here on only (min_tokens reached)."""
        if not self.stops_active:
            self.stops_active = True
            self.stop_from = self.checked = len(self.text)

    def cut_at_stop(self) -> bool:
        """If the text now contains a stop string, cut it before the first match (after it, with `include_stop`)
        and return True."""
        if not self.stop or not self.stops_active:
            return False
        text = self.text
        # a new match must end in text not checked before; matches never start in emitted text
        start = max(self.emitted, self.checked - self.max_stop_len + 1, self.stop_from, 0)
        self.checked = len(text)
        best, best_stop = -1, ""
        for stop in self.stop:
            at = text.find(stop, start)
            if at != -1 and (best == -1 or at < best):
                best, best_stop = at, stop
        if best == -1:
            return False
        end = best + len(best_stop) if self.include_stop else best
        self.text = text[:end]
        self.checked = end
        return True

    def releasable(self) -> str:
        """The text not handed out yet that can no longer be part of a stop string; counted as handed out."""
        hold = self._stop_prefix_len() if self.stop and self.stops_active else 0
        end = max(self.emitted, len(self.text) - hold)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece

    def rest(self) -> str:
        """Everything not handed out yet (at the end of the sequence); counted as handed out."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        text = self.text
        for k in range(min(self.max_stop_len - 1, len(text) - max(self.emitted, self.stop_from)), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self.stop):
                return k
        return 0
