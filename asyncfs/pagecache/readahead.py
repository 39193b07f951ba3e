"""Per-open-file readahead policy after mm/readahead.c ``ondemand_readahead`` (pure).

State is in file pages: the current window ``[start, start + size)`` of which the last
``async_size`` pages are the async tail; the READAHEAD marker goes on the first page of that
tail. ``ra_pages`` is the maximum window (it shrinks to a quarter on an I/O error, as
``shrink_readahead_size_eio``). ``prev_index`` is the last page the file read, to tell a
sequential miss from a random one.

Rules kept from the kernel:
- a sync call (cache miss) at file start, or right after the previous read, or for a request
  larger than the max window starts an *initial* window sized from the request;
- a call at the expected next index (the marker, or the end of the window) *ramps up*: the
  next window follows the current one, 4x then 2x larger up to ``ra_pages``;
- a marker hit with state that does not match (interleaved readers) restarts from the hit;
- any other miss is a random read: read just the request and leave the state alone;
- windows are clamped at EOF; the marker is never placed past EOF.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReadaheadWindow:
    """Pages ``[start, start + size)`` to bring in; ``marker`` is the page to flag READAHEAD
    (``None``: no marker, e.g. a random read or a window clipped before its async tail)."""

    start: int
    size: int
    marker: int | None


def _roundup_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def get_init_ra_size(req: int, max_pages: int) -> int:
    new = _roundup_pow2(req)
    if new <= max_pages // 32:
        new *= 4
    elif new <= max_pages // 4:
        new *= 2
    else:
        new = max_pages
    return max(1, min(new, max_pages))


def get_next_ra_size(cur: int, max_pages: int) -> int:
    if cur < max_pages // 16:
        return min(4 * cur, max_pages)
    if cur <= max_pages // 2:
        return min(2 * cur, max_pages)
    return max_pages


class FileReadahead:
    """``struct file_ra_state`` plus the decision function. Counts what it does for tests."""

    __slots__ = ("async_size", "prev_index", "ra_pages", "size", "start")

    def __init__(self, ra_pages: int) -> None:
        self.ra_pages = max(0, ra_pages)
        self.start = 0
        self.size = 0
        self.async_size = 0
        self.prev_index = -1

    def state(self) -> tuple[int, int, int]:
        return (self.start, self.size, self.async_size)

    def shrink_on_error(self) -> None:
        """``shrink_readahead_size_eio``: a failing device gets smaller windows."""
        self.ra_pages //= 4

    def note_read(self, last_index: int) -> None:
        """Remember where the file's last read ended (``ra->prev_pos``)."""
        self.prev_index = last_index

    def ondemand(
        self, index: int, req_pages: int, *, hit_marker: bool, eof_pages: int
    ) -> ReadaheadWindow | None:
        """Decide the window for a read of ``req_pages`` at ``index``; ``hit_marker`` is the
        async trigger (the READAHEAD page was found and test-and-cleared), else this is the
        sync trigger on a miss. ``eof_pages`` is the file size in pages (rounded up).
        ``None``: nothing to read (readahead off, or at/after EOF for an async call)."""
        max_pages = self.ra_pages
        if index >= eof_pages:
            return None
        if max_pages == 0:
            if hit_marker:
                return None
            return self._clamp(index, req_pages, None, eof_pages)

        expected = self.start + self.size
        if index == 0 and not hit_marker:
            self._initial(index, req_pages, max_pages)
        elif self.size and (index == expected - self.async_size or index == expected):
            # Sequential, at the marker or the end of the window: ramp up.
            self.start = expected
            self.size = get_next_ra_size(self.size, max_pages)
            self.async_size = self.size
        elif hit_marker:
            # Marker of a window this state did not start (interleaved streams): restart the
            # pipeline right after the hit, as large as it has grown.
            self.start = index + 1
            self.size = get_next_ra_size(max(req_pages, 1), max_pages)
            self.async_size = self.size
        elif req_pages > max_pages or index - 1 == self.prev_index:
            self._initial(index, req_pages, max_pages)
        else:
            # Random read: only the request, state untouched.
            return self._clamp(index, req_pages, None, eof_pages)

        # Initial window at start of a sequential stream: add the next window as async tail.
        if not hit_marker and index == self.start and self.size == self.async_size:
            add = get_next_ra_size(self.size, max_pages)
            if self.size + add <= max_pages:
                self.async_size = add
                self.size += add
            else:
                self.size = max_pages
                self.async_size = max_pages >> 1
        marker = self.start + self.size - self.async_size if self.async_size else None
        return self._clamp(self.start, self.size, marker, eof_pages)

    def _initial(self, index: int, req_pages: int, max_pages: int) -> None:
        self.start = index
        self.size = get_init_ra_size(req_pages, max_pages)
        self.async_size = self.size - req_pages if self.size > req_pages else self.size

    @staticmethod
    def _clamp(start: int, size: int, marker: int | None, eof_pages: int) -> ReadaheadWindow:
        end = min(start + size, eof_pages)
        if marker is not None and marker >= end:
            marker = None
        return ReadaheadWindow(start, max(0, end - start), marker)
