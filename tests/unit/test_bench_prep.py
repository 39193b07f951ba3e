"""The harness's cold preparation: where a file lies in the image, priming the storage under it,
the workload selector, foreign cache drops, the kernel tuning read back, and the report of it.

Real parts: images made with ``mke2fs -d``, files in tmp_path read with O_DIRECT, ``fincore``
to see what the page cache holds. Nothing here drops the machine's caches or mounts anything.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import image as img
from bench import report as bench_report
from bench import run as bench_run
from bench import targets as bench_targets
from bench.report import Measurement, Results, RunInfo
from bench.run import _foreign_drops, selected_workloads
from bench.targets import Mounted, kernel_tuning
from tests.mutants import breaks

needs_e2fs = pytest.mark.skipif(shutil.which("mke2fs") is None or shutil.which("debugfs") is None,
                                reason="e2fsprogs not installed")

# Real `debugfs -R "ex big.bin"` output of the benchmark image (depth-1 extent tree): the first
# entry is the index block, the others are data.
DEBUGFS_EX_DEPTH1 = """\
Level Entries         Logical        Physical Length Flags
 0/ 1   1/  1      0 - 524287 131535          524288
 1/ 1   1/ 18      0 -  24106   8661 -  32767  24107
 1/ 1   2/ 18  24107 -  56873  33231 -  65997  32767
 1/ 1   5/ 18 121947 - 121947 131534 - 131534      1
 1/ 1   6/ 18 121948 - 154251 131536 - 163839  32304
"""


# the extent pattern reading the logical columns instead of the physical ones
_LOGICAL_EXTENT_RE = re.compile(
    r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+\d+\s*-\s*\d+\s+\d+")


@pytest.mark.parametrize("variant", ["kernel", "logical_columns"])
def test_parse_extents_keeps_data_leaves_not_the_index_block(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: a pattern that reads the logical columns primes the wrong blocks (here
    it would start at 0). The index entry (block 131535) has no physical range, which the
    pattern needs, so it is never taken for data."""
    if variant != "kernel":
        monkeypatch.setattr(img, "_EXTENT_RE", _LOGICAL_EXTENT_RE)
    spans = img.parse_extents(DEBUGFS_EX_DEPTH1)
    b = img.BLOCK
    assert (spans[0][0] == 8661 * b) == (variant == "kernel"), spans
    if variant != "kernel":
        return
    assert spans == [
        (8661 * b, (32767 - 8661 + 1) * b),
        (33231 * b, (65997 - 33231 + 1) * b),
        (131534 * b, b),  # block 131535 between these two is the index block: not data
        (131536 * b, (163839 - 131536 + 1) * b),
    ]
    assert sum(n for _, n in spans) == (24107 + 32767 + 1 + 32304) * b


@needs_e2fs
@pytest.mark.parametrize("variant", ["kernel", "logical_columns"])
def test_file_extents_point_at_the_files_bytes(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spans, read from the image, are the file's content (a real ``mke2fs -d`` image).

    Broken variant: taking the logical block numbers as physical ones reads the superblock
    area, not the file.
    """
    if variant != "kernel":
        monkeypatch.setattr(img, "_EXTENT_RE", _LOGICAL_EXTENT_RE)
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(300 * 1024 + 123)
    (src / "f.bin").write_bytes(data)
    (src / "small").write_bytes(b"x" * 5000)
    image = tmp_path / "t.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(src), str(image),
                    "8M"], check=True, capture_output=True)
    spans = img.file_extents(image, "f.bin")
    with open(image, "rb") as f:
        got = b"".join(os.pread(f.fileno(), n, off) for off, n in spans)
    assert (got[: len(data)] == data) == (variant == "kernel")
    if variant != "kernel":
        return
    assert len(got) == -(-len(data) // 4096) * 4096
    with pytest.raises(RuntimeError):
        img.file_extents(image, "missing")


def _covered(spans: list[img.Span]) -> set[int]:
    return {b for off, n in spans for b in range(off, off + n)}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=12),
       st.integers(0, 250))
def test_merge_and_complement_partition_the_image(raw: list[img.Span], size: int) -> None:
    """merge keeps exactly the covered bytes, sorted and disjoint; complement is the rest.

    The broken complement (``pos`` moved back by a nested span) is built in
    ``test_complement_of_a_nested_span``.
    """
    merged = img.merge_spans(raw)
    assert _covered(merged) == _covered(raw)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(merged))
    rest = img.complement_spans(raw, size)
    assert _covered(rest) == set(range(size)) - _covered(raw)
    assert all(n > 0 for _, n in rest)


@pytest.mark.parametrize("variant", ["kernel", "unmerged_pos_reset"])
def test_complement_of_a_nested_span(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A span inside an earlier, longer one leaves the complement as it was.

    Broken variant: a complement over the raw spans that advances ``pos`` to the end of each
    span even when an earlier, longer span already covers further gives bytes to both sides.
    """
    breaks(variant, monkeypatch, img, "complement_spans",
           "for off, length in merge_spans(spans):\n        if off > pos:\n"
           "            out.append((pos, min(off, size) - pos))\n"
           "        pos = max(pos, off + length)",
           "for off, length in sorted(spans):\n        if off > pos:\n"
           "            out.append((pos, min(off, size) - pos))\n"
           "        pos = off + length")
    raw = [(0, 100), (10, 5)]
    rest = img.complement_spans(raw, 150)
    assert (_covered(rest) == set(range(150)) - _covered(raw)) == (variant == "kernel"), rest


def _resident_pages(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


_PRIME_BROKEN = {
    "buffered": ("fd = os.open(image, os.O_RDONLY | os.O_DIRECT)",
                 "fd = os.open(image, os.O_RDONLY)"),
    "first_chunk_only": ("pos += n", "pos = end"),
}


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore missing")
@pytest.mark.parametrize("variant", ["kernel", *_PRIME_BROKEN])
def test_prime_storage_reads_every_span_and_leaves_no_page_cache(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Priming must read the spans (all of them, in chunks) without filling this kernel's page
    cache: drop_caches after it would otherwise be the only thing keeping the cell cold.

    Broken variants: buffered reads leave the file resident (fincore > 0); a loop that stops
    after the first chunk reads fewer bytes.
    """
    if variant != "kernel":
        breaks(variant, monkeypatch, img, "prime_storage", *_PRIME_BROKEN[variant])
    p = tmp_path / "img.bin"
    p.write_bytes(os.urandom(1 << 20))
    img.uncache_file(p)
    try:
        os.close(os.open(p, os.O_RDONLY | os.O_DIRECT))
        direct_ok = True
    except OSError:  # tmpfs: priming falls back to buffered reads + DONTNEED
        direct_ok = False
    before = _resident_pages(p)
    spans = [(0, 200 * 1024), (512 * 1024, 300 * 1024), (1000 * 1024, 100 * 1024)]  # last: EOF
    res = img.prime_storage(p, spans, chunk=64 * 1024)
    assert res.direct == direct_ok
    right = (res.nbytes == 200 * 1024 + 300 * 1024 + 24 * 1024
             and _resident_pages(p) <= before)  # (buffered fallback: dropped afterwards)
    assert right == (variant == "kernel"), (res.nbytes, _resident_pages(p), before)
    assert "MiB/s" in res.describe()


_SELECT_BROKEN = {
    "only_adds_rand4k": ("return set(names)", 'return set(names) | {"rand4k"}'),
    "skip_keeps_warm": ('run.discard("warm")', "pass"),
}


@pytest.mark.parametrize("variant", ["kernel", *_SELECT_BROKEN])
def test_selected_workloads(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variants: ``--only seq1m`` still running rand4k, or --skip rand4k running its
    warm cells, which need the random cells' mount pattern."""
    if variant != "kernel":
        breaks(variant, monkeypatch, bench_run, "selected_workloads", *_SELECT_BROKEN[variant])
    select = bench_run.selected_workloads
    right = (select("seq1m", "") == {"seq1m"}
             and select("", "rand4k,memory") == {"seq1m", "smallfiles", "scaling"})
    assert right == (variant == "kernel")
    if variant != "kernel":
        return
    assert selected_workloads("warm", "") == {"warm"}
    assert selected_workloads("", "") == {"rand4k", "seq1m", "warm", "smallfiles", "scaling",
                                          "memory"}
    with pytest.raises(SystemExit):
        selected_workloads("seq", "")


@pytest.mark.parametrize("variant", ["kernel", "every_drop"])
def test_foreign_drops_subtract_our_own(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: counting every drop flags the scaling cells, which drop caches
    themselves, as disturbed."""
    breaks(variant, monkeypatch, bench_run, "_foreign_drops",
           "after - before - own", "after - before")
    assert (bench_run._foreign_drops(10, 13, own=3) == 0) == (variant == "kernel")
    if variant != "kernel":
        return
    assert _foreign_drops(10, 13, own=3) == 0
    assert _foreign_drops(10, 13, own=1) == 2
    assert _foreign_drops(None, 13, own=0) == 0
    counter = img.page_cache_drops()
    assert counter is None or counter >= 0


@pytest.mark.parametrize("variant", ["kernel", "st_rdev"])
def test_kernel_tuning_of_the_raw_image_names_its_disk(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: st_rdev (0 for a regular file) instead of st_dev names bdi 0:0."""
    breaks(variant, monkeypatch, bench_targets, "kernel_tuning",
           "st = os.stat(m.image).st_dev", "st = os.stat(m.image).st_rdev")
    p = tmp_path / "raw.img"
    p.write_bytes(b"\0" * 4096)
    st = os.stat(p).st_dev
    dev = f"{os.major(st)}:{os.minor(st)}"
    text = bench_targets.kernel_tuning(Mounted("raw", "", None, p))
    assert (f"disk {dev}" in text) == (variant == "kernel"), text
    if variant != "kernel":
        return
    assert kernel_tuning is bench_targets.kernel_tuning
    ra = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
    if ra.exists():
        assert f"read_ahead_kb {ra.read_text().strip()} " in text


@pytest.mark.parametrize("variant", ["kernel", "asyncfs_only"])
def test_report_lists_every_targets_preparation_and_reads_old_json(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel and fuse2fs cells' preparation is shown too (the asyncfs-only notes section
    is not enough to compare cold starts), and results saved before ``prep`` existed load.

    Broken variant: rendering ``prep`` only for asyncfs targets drops the kernel's line.
    """
    breaks(variant, monkeypatch, bench_report, "render_markdown",
           "preps = [m for m in results.measurements if m.prep]",
           'preps = [m for m in results.measurements if m.prep and m.target.startswith("asyncfs")]')
    res = Results(RunInfo(command="bench/run.py", started="now", quick=False,
                          availability={"asyncfs-async": "ok", "kernel": "ok"}), [
        Measurement("seq1m", "asyncfs-async", "cold", 1, mib_s=500.0,
                    prep="storage primed: 2,668 MiB; read_ahead_kb 1024, max_background 64"),
        Measurement("seq1m", "kernel", "cold", 1, mib_s=480.0,
                    prep="storage primed: 2,668 MiB; read_ahead_kb 2560 (loop /dev/loop0 7:0)"),
    ])
    md = bench_report.render_markdown(res)
    kernel_line = "- `kernel` seq1m/cold/1: storage primed: 2,668 MiB; read_ahead_kb 2560"
    assert (kernel_line in md) == (variant == "kernel")
    if variant != "kernel":
        return
    assert "max_background 64" in md
    doc = json.loads(res.to_json())
    for m in doc["measurements"]:
        del m["prep"]
    again = Results.from_json(json.dumps(doc))
    assert again.measurements[0].prep == "" and again.measurements[0].mib_s == 500.0
