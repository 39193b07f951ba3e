"""The per-file readahead policy (``ondemand_readahead``), pure (invariant 13)."""

from __future__ import annotations

import pytest

from asyncfs.pagecache import FileReadahead
from asyncfs.pagecache.readahead import get_init_ra_size, get_next_ra_size
from tests.mutants import mutant


def test_initial_window_and_ramp_up() -> None:
    ra = FileReadahead(32)
    w = ra.ondemand(0, 1, hit_marker=False, eof_pages=1000)
    # As the kernel: a 1-page read at 0 reads 4 pages, the marker on the first async one.
    assert w is not None and (w.start, w.size, w.marker) == (0, 4, 1)
    ra.note_read(0)
    w2 = ra.ondemand(1, 1, hit_marker=True, eof_pages=1000)  # the marker page is hit
    assert w2 is not None and (w2.start, w2.size, w2.marker) == (4, 8, 4)
    w3 = ra.ondemand(4, 1, hit_marker=True, eof_pages=1000)
    assert w3 is not None and (w3.start, w3.size, w3.marker) == (12, 16, 12)
    w4 = ra.ondemand(12, 1, hit_marker=True, eof_pages=1000)
    assert w4 is not None and (w4.start, w4.size) == (28, 32)
    w5 = ra.ondemand(28, 1, hit_marker=True, eof_pages=1000)
    assert w5 is not None and w5.size == 32  # capped at ra_pages
    big = FileReadahead(32).ondemand(0, 32, hit_marker=False, eof_pages=1000)
    assert big is not None and (big.size, big.marker) == (32, 16)
    assert get_init_ra_size(1, 32) == 4 and get_init_ra_size(32, 32) == 32
    assert get_next_ra_size(1, 32) == 4 and get_next_ra_size(16, 32) == 32


def test_sequential_miss_after_prev_read_starts_window() -> None:
    ra = FileReadahead(32)
    ra.note_read(99)
    w = ra.ondemand(100, 2, hit_marker=False, eof_pages=1000)
    assert w is not None and w.start == 100 and w.size > 2 and w.marker is not None


@pytest.mark.parametrize("variant", ["kernel", "broken"])
def test_inv13_random_reads_leave_state_alone(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random miss reads just the request, with no marker, and keeps the stream state.

    Broken variant: random misses restart the window (``_initial``), wrecking the state of
    a sequential stream interleaved with random reads."""
    if variant == "broken":
        monkeypatch.setattr(
            FileReadahead, "ondemand",
            mutant(FileReadahead, "ondemand",
                   "        # Random read: only the request, state untouched.\n",
                   "        self._initial(index, req_pages, max_pages)\n"),
        )
    ra = FileReadahead(32)
    ra.ondemand(0, 1, hit_marker=False, eof_pages=1000)
    before = ra.state()
    w = ra.ondemand(500, 2, hit_marker=False, eof_pages=1000)
    assert w is not None and (w.start, w.size) == (500, 2)
    ok = ra.state() == before and w.marker is None
    assert ok == (variant == "kernel")


@pytest.mark.parametrize("variant", ["kernel", "broken"])
def test_inv13_eof_clamp_and_no_marker_past_eof(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows stop at EOF and the marker is never placed at or past EOF.

    Broken variant: ``_clamp`` keeps the marker even when it falls past the clamped end."""
    if variant == "broken":
        monkeypatch.setattr(
            FileReadahead, "_clamp",
            mutant(FileReadahead, "_clamp", "if marker is not None and marker >= end:",
                   "if False:"),
        )
    ra = FileReadahead(32)
    w = ra.ondemand(0, 1, hit_marker=False, eof_pages=1)  # window 4, marker 1, file 1 page
    assert w is not None and (w.start, w.size) == (0, 1)
    assert (w.marker is None) == (variant == "kernel")
    assert ra.ondemand(1, 1, hit_marker=True, eof_pages=1) is None


@pytest.mark.parametrize("variant", ["kernel", "broken"])
def test_inv13_io_error_shrinks_window(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an I/O error the file's windows are a quarter of the maximum.

    Broken variant: ``shrink_on_error`` leaves the maximum alone."""
    if variant == "broken":
        monkeypatch.setattr(
            FileReadahead, "shrink_on_error",
            mutant(FileReadahead, "shrink_on_error", "self.ra_pages //= 4", "pass"),
        )
    ra = FileReadahead(32)
    ra.shrink_on_error()
    w = ra.ondemand(0, 32, hit_marker=False, eof_pages=1000)
    assert w is not None
    assert (w.size <= 8) == (variant == "kernel")


def test_disabled_readahead_reads_request_only() -> None:
    ra = FileReadahead(0)
    w = ra.ondemand(0, 3, hit_marker=False, eof_pages=100)
    assert w is not None and (w.start, w.size, w.marker) == (0, 3, None)
    assert ra.ondemand(5, 1, hit_marker=True, eof_pages=100) is None


def test_marker_of_interleaved_stream_restarts_after_hit() -> None:
    ra = FileReadahead(32)
    ra.ondemand(0, 1, hit_marker=False, eof_pages=1000)
    w = ra.ondemand(300, 1, hit_marker=True, eof_pages=1000)  # not this state's marker
    assert w is not None and w.start == 301 and w.marker == 301
