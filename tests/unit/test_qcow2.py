"""qcow2 images made by qemu-img and qemu-io, read through ``open_image`` and compared block for
block with ``qemu-img convert -O raw`` of the same image (the oracle): every format variant,
backing chains, subclusters, damage, refusals. Each invariant is also run against a deliberately
broken variant of the reader, which must fail it."""

from __future__ import annotations

import mmap
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from asyncfs.errors import DeviceIOError, ImageError
from asyncfs.io import format as fmtmod
from asyncfs.io import open as openmod
from asyncfs.io import qcow2, qcow2dev
from asyncfs.io.describe import describe_source
from asyncfs.io.open import open_image
from tests.mutants import mutant

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io")
                                is None, reason="qemu-img/qemu-io missing (package qemu-utils)")

MIB = 1 << 20
VARIANTS = ["real", "broken"]


def run(*cmd: str | Path) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (cmd, r.stderr)
    return r.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qcow2")


@pytest.fixture(scope="module")
def source(work: Path) -> Path:
    """An 8 MiB raw disk: compressible text, random bytes, written zeros and a hole."""
    rng = random.Random(5)
    path = work / "source.raw"
    with open(path, "wb") as f:
        f.write(b"".join(b"line %08d of a compressible text\n" % i for i in range(50_000)))
        f.write(rng.randbytes(2 * MIB))
        f.write(bytes(MIB))
        f.seek(6 * MIB + 12345)
        f.write(rng.randbytes(MIB))
        f.truncate(8 * MIB)
    return path


def convert(src: Path, dst: Path, *opts: str) -> Path:
    run("qemu-img", "convert", "-O", "qcow2", *opts, src, dst)
    return dst


def oracle(img: Path) -> bytes:
    raw = img.with_suffix(".oracle")
    run("qemu-img", "convert", "-O", "raw", img, raw)
    return raw.read_bytes()


async def read_all(path: Path | str, size: int, chunk: int = MIB) -> bytes:
    dev = await open_image(path)
    try:
        assert dev.size == size
        return b"".join([bytes(await dev.read(off, min(chunk, size - off)))
                         for off in range(0, size, chunk)])
    finally:
        await dev.aclose()


async def random_reads(path: Path, want: bytes, n: int = 200) -> None:
    """Unaligned reads of every size, many of them concurrently."""
    rng = random.Random(9)
    dev = await open_image(path)
    try:
        async def one(off: int, length: int) -> None:
            assert bytes(await dev.read(off, length)) == want[off:off + length], (off, length)

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                off = rng.randrange(len(want))
                nursery.start_soon(one, off, min(rng.randrange(1, 300_000), len(want) - off))
    finally:
        await dev.aclose()


FORMATS = {
    "plain": (),
    "deflate": ("-c",),
    "zstd": ("-c", "-o", "compression_type=zstd"),
    "extended-l2": ("-o", "extended_l2=on"),
    "v2": ("-o", "compat=0.10"),
    "v2-deflate-4k": ("-c", "-o", "compat=0.10,cluster_size=4096"),
    "512-clusters": ("-o", "cluster_size=512"),
    "2m-clusters-zstd": ("-c", "-o", "cluster_size=2M,compression_type=zstd"),
}


@pytest.mark.parametrize("name", list(FORMATS))
async def test_every_format_reads_as_qemu_reads_it(work: Path, source: Path, name: str) -> None:
    """Each qcow2 flavour qemu-img writes reads back exactly as ``qemu-img convert -O raw``:
    in 1 MiB chunks and in concurrent unaligned reads."""
    img = convert(source, work / f"{name}.qcow2", *FORMATS[name])
    want = oracle(img)
    assert await read_all(img, len(want)) == want
    await random_reads(img, want)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_compressed_clusters(work: Path, source: Path, variant: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """deflate and zstd clusters inflate to the right bytes, read whole or a page at a time.
    Broken variant: the offset into the inflated cluster ignored (every page of a cluster
    reads as its first)."""
    if variant == "broken":
        monkeypatch.setattr(qcow2dev.Qcow2Device, "_fill", mutant(
            qcow2dev.Qcow2Device, "_fill", "data[e.skip:e.skip + e.length]", "data[:e.length]"))
    for name in ("deflate", "zstd"):
        img = convert(source, work / f"c-{name}.qcow2", *FORMATS[name])
        want = oracle(img)
        got = await read_all(img, len(want), chunk=4096)
        assert (got == want) == (variant == "real"), name


def _chain(work: Path) -> Path:
    """base.raw <- mid.qcow2 (v2, relative name, raw backing) <- top.qcow2 (absolute name,
    qcow2 backing, extended L2, larger than its backing): zero clusters, subclusters, and ranges
    found only in the backing files."""
    d = work / "chain"
    if d.exists():
        return d / "top.qcow2"
    d.mkdir()
    run("qemu-img", "create", "-q", "-f", "raw", d / "base.raw", "6M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 6M", d / "base.raw")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw",
        "-F", "raw", d / "mid.qcow2")
    run("qemu-io", "-c", "write -P 0x22 1M 2M", "-c", "write -z 4M 1M", d / "mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", d / "mid.qcow2", "-F", "qcow2",
        "-o", "extended_l2=on", d / "top.qcow2", "9M")
    run("qemu-io", "-c", "write -P 0x33 1540k 3k", "-c", "write -P 0x44 7M 100k",
        "-c", "write -z 2M 64k", "-c", "write -z 2200k 4k", "-c", "write -P 0x55 5M 8k",
        d / "top.qcow2")
    return d / "top.qcow2"


@pytest.mark.parametrize("variant", ["real", "no-subclusters", "no-backing", "cwd-relative"])
async def test_backing_chain_of_three(work: Path, variant: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain of three (qcow2 with subclusters -> qcow2 -> raw, by absolute and relative
    names) reads as qemu reads it, from any working directory. Broken variants: subcluster
    bitmaps ignored; unallocated ranges read as zeros instead of from the backing file; a
    relative backing name resolved against the working directory."""
    top = _chain(work)
    if variant == "no-subclusters":
        monkeypatch.setattr(qcow2dev, "cluster_extents", mutant(
            qcow2, "cluster_extents", "alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32",
            "alloc, zero = 0xFFFFFFFF, 0"))
    elif variant == "no-backing":
        monkeypatch.setattr(qcow2dev.Qcow2Device, "_fill", mutant(
            qcow2dev.Qcow2Device, "_fill", "e.kind == UNALLOCATED and self._backing is not None",
            "e.kind == UNALLOCATED and False"))
    elif variant == "cwd-relative":
        broken = mutant(fmtmod, "open_format",
                        "os.path.dirname(os.path.abspath(path_for_backing))", "os.getcwd()")
        monkeypatch.setattr(fmtmod, "open_format", broken)
        monkeypatch.setattr(openmod, "open_format", broken)
    monkeypatch.chdir("/")
    want = oracle(top)
    try:
        got: bytes | None = await read_all(top, len(want), chunk=64 * 1024)
    except (ImageError, DeviceIOError):
        got = None
    assert (got == want) == (variant == "real")
    if variant == "real":
        info = (await describe_source(str(top))).format()
        assert "extended L2" in info and "mid.qcow2 (qcow2 v2" in info, info
        assert "base.raw (raw" in info, info


@pytest.mark.parametrize("variant", ["real", "broken"])
async def test_reads_straight_into_page_frames(work: Path, source: Path, variant: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest range that maps to one run of data clusters (L2 table cached) is handed to the
    file backend's ``submit_read_into``, into the caller's (page-aligned) buffers: the bytes
    are right, and ranges it cannot serve that way are declined, never misread. Broken
    variant: the offset inside the first cluster dropped."""
    if variant == "broken":
        monkeypatch.setattr(qcow2dev.Qcow2Device, "_scan", mutant(
            qcow2dev.Qcow2Device, "_scan", "host = base + offset - first * csize",
            "host = base"))
    img = convert(source, work / "frames.qcow2")
    want = oracle(img)
    dev = await open_image(img)
    try:
        assert isinstance(dev, qcow2dev.Qcow2Device)
        await dev.read(0, 4096)  # brings the L2 table in
        started = right = 0
        for off, n in ((0, 65536), (17 * 4096, 8192), (MIB + 4096, 2 * MIB),
                       (6 * MIB + 16384, 4096), (4 * MIB, 4096)):
            frame = mmap.mmap(-1, n)
            done = trio.Event()
            errors: list[object] = []

            def callback(err: object, released: bool, errors: list[object] = errors,
                         done: trio.Event = done) -> None:
                errors.append(err)
                done.set()

            with memoryview(frame) as view:
                if dev.submit_read_into(off, [view], callback):
                    started += 1
                    await done.wait()
                    assert errors == [None]
                    right += frame[:] == want[off:off + n]
            frame.close()
        assert started == 4  # the last range is a hole: declined
        assert (right == started) == (variant == "real")
    finally:
        await dev.aclose()


def _l2_entry_offset(img: Path, cluster: int) -> int:
    """Where in the file the L2 entry of guest cluster ``cluster`` is (no extended L2)."""
    data = img.read_bytes()
    hdr = qcow2.parse_header(data[:65536], len(data), str(img))
    l1i, idx = divmod(cluster, hdr.l2_entries)
    l1e = struct.unpack_from(">Q", data, hdr.l1_offset + 8 * l1i)[0]
    return (l1e & ((1 << 56) - 1) & ~0x1FF) + 8 * idx


def _poke(img: Path, at: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(data)


@pytest.mark.parametrize("variant", ["real", "no-bounds"])
async def test_damaged_entries_fail_only_their_clusters(
        work: Path, source: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An L2 entry pointing past the end of the file, and a compressed cluster whose bytes
    are garbage: reads of those clusters fail with DeviceIOError (EIO), their neighbours read
    right, nothing hangs. Broken variant: no bounds check on data cluster offsets (the bad
    cluster silently reads as zeros)."""
    if variant == "no-bounds":
        monkeypatch.setattr(qcow2dev, "cluster_extents", mutant(
            qcow2, "cluster_extents", "off % csize or off >= file_size", "off % csize"))
    csize = 65536
    img = convert(source, work / "damaged.qcow2")
    want = oracle(img)
    _poke(img, _l2_entry_offset(img, 40), struct.pack(">Q", (1 << 63) | (1 << 40)))
    cimg = convert(source, work / "damaged-c.qcow2", "-c")
    entry = struct.unpack(">Q", cimg.read_bytes()[_l2_entry_offset(cimg, 3):][:8])[0]
    host, _ = qcow2.compressed_span(qcow2.parse_header(cimg.read_bytes()[:4096], 1 << 30, ""),
                                    entry)
    _poke(cimg, host, b"\xff" * 64)
    failures = 0
    with trio.fail_after(20):
        for path, bad in ((img, 40), (cimg, 3)):
            dev = await open_image(path)
            try:
                for c in (bad - 1, bad, bad + 1):
                    try:
                        got = bytes(await dev.read(c * csize, csize))
                    except DeviceIOError as err:
                        assert c == bad, err
                        assert "\n" not in str(err)
                        failures += 1
                        continue
                    if c != bad:
                        assert got == want[c * csize:(c + 1) * csize]
            finally:
                await dev.aclose()
    assert failures == (2 if variant == "real" else 1)


def _qcow2_with_backing(path: Path, backing: str) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", path,
        "1M")


async def test_backing_loop_and_missing_backing_are_one_line_errors(work: Path) -> None:
    """A chain that loops (a -> b -> a) and a missing backing file: ImageError, one line."""
    d = work / "loop"
    d.mkdir()
    _qcow2_with_backing(d / "a.qcow2", "b.qcow2")
    _qcow2_with_backing(d / "b.qcow2", "a.qcow2")
    _qcow2_with_backing(d / "self.qcow2", "self.qcow2")
    _qcow2_with_backing(d / "orphan.qcow2", "gone.qcow2")
    for name, needle in (("a.qcow2", "loops"), ("self.qcow2", "loops"),
                         ("orphan.qcow2", "does not exist")):
        with trio.fail_after(10), pytest.raises(ImageError) as exc:
            await open_image(d / name)
        assert needle in str(exc.value) and "\n" not in str(exc.value), exc.value


async def test_refusals(work: Path, source: Path) -> None:
    """Encryption and external data files are refused in one line naming the feature."""
    d = work / "refuse"
    d.mkdir()
    run("qemu-img", "create", "-q", "--object", "secret,id=s0,data=pw", "-f", "qcow2",
        "-o", "encrypt.format=luks,encrypt.key-secret=s0", d / "luks.qcow2", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'data.raw'}",
        d / "ext.qcow2", "1M")
    for name, needle in (("luks.qcow2", "encrypted"), ("ext.qcow2", "external data file")):
        with pytest.raises(ImageError) as exc:
            await open_image(d / name)
        assert needle in str(exc.value) and "\n" not in str(exc.value), exc.value


async def test_missing_zstd_module_fails_only_zstd_images(
        work: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the zstandard module a zstd image is refused in one line; zlib images read."""
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails
    z = convert(source, work / "nozstd.qcow2", *FORMATS["zstd"])
    with pytest.raises(ImageError, match="zstandard is not installed"):
        await open_image(z)
    d = convert(source, work / "nozstd-deflate.qcow2", "-c")
    assert await read_all(d, 8 * MIB) == oracle(d)


@pytest.mark.parametrize("bit,qemu_words", [(1, "cleanly shut down: no"), (2, "corrupt: true")])
async def test_dirty_and_corrupt_bits_reported_as_qemu_sees_them(
        work: Path, source: Path, bit: int, qemu_words: str) -> None:
    """The dirty and corrupt header bits: ``qemu-img check`` finds no error and the image is
    read as mapped; ``asyncfs info`` warns in the words ``qemu-img info`` uses."""
    img = convert(source, work / f"bits-{bit}.qcow2")
    _poke(img, 79, bytes([bit]))
    assert "No errors were found" in run("qemu-img", "check", img)
    assert qemu_words in run("qemu-img", "info", img)
    info = (await describe_source(str(img))).format()
    assert f"warning: {qemu_words}" in info, info
    assert await read_all(img, 8 * MIB) == source.read_bytes()


async def test_l2_cache_is_bounded(work: Path, source: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With 512-byte clusters (an L2 table per 32 KiB of guest disk) and the cache held to 8
    tables, a full read still matches and the cache never grows past its bound."""
    monkeypatch.setattr(qcow2dev, "L2_CACHE_BYTES", 1)
    img = convert(source, work / "tiny-l2.qcow2", "-o", "cluster_size=512")
    dev = await open_image(img)
    try:
        assert isinstance(dev, qcow2dev.Qcow2Device)
        got = b"".join([bytes(await dev.read(o, MIB)) for o in range(0, 8 * MIB, MIB)])
        assert got == oracle(img)
        assert len(dev._l2) <= 8 and dev.l2_loads > 8
    finally:
        await dev.aclose()


def test_header_parse_rejects_hostile_fields() -> None:
    """Pure decoding: out-of-range fields are one-line ImageErrors, never a crash."""
    base = bytearray(4096)
    base[:4] = qcow2.MAGIC
    struct.pack_into(">IQIIQIIQ", base, 4, 3, 0, 0, 16, 1 << 20, 0, 1, 65536)
    struct.pack_into(">QQQII", base, 72, 0, 0, 0, 4, 104)
    ok = qcow2.parse_header(bytes(base), 1 << 20, "x")
    assert ok.cluster_size == 65536 and ok.size == 1 << 20
    for field, fmt, value, needle in ((20, ">I", 40, "cluster_bits"), (4, ">I", 9, "version"),
                                      (36, ">I", 0, "L1 table"), (40, ">Q", 1 << 40, "outside"),
                                      (72, ">Q", 1 << 20, "unknown incompatible")):
        bad = bytearray(base)
        struct.pack_into(fmt, bad, field, value)
        with pytest.raises(ImageError, match=needle):
            qcow2.parse_header(bytes(bad), 1 << 20, "x")
