"""Remote images through real servers on loopback, mounted with the real `asyncfs mount`:
nginx serves the images with Range (plain and TLS with a CA made by the test), the delay proxy
(``bench/netproxy.py``) adds a round-trip time, moto's S3 server checks signatures. The trees
read back are compared with a local mount of the same image and with the source tree.

Changing the object under the mount, 503s for a while, a killed server: no read may ever
return a wrong byte (EIO is allowed, a byte of another version is not). The unit tests of each
rule, which also build each rule broken, are ``tests/unit/test_http_device.py`` and
``tests/unit/test_s3.py``.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from asyncfs.cli.main import main
from asyncfs.errors import ImageError
from asyncfs.io import open_image
from asyncfs.io.remote import RemoteOptions
from asyncfs.testing.imagegen import ALL_FIELDS, compare_trees, make_image
from bench.remote_servers import Nginx, delay_proxy, moto, moto_missing, nginx, nginx_missing
from tests.mount.helpers import mounted, regular_files, require_fuse, run_asyncfs, stats

pytestmark = pytest.mark.mount
SOURCE = frozenset({"content", "link", "size"})
MIB = 1 << 20


@dataclass
class Served:
    srv: Nginx
    root: Path
    ca: Path


@pytest.fixture(scope="module")
def served(ext4_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_fuse()
    why = nginx_missing()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("remote")
    root = base / "root"
    root.mkdir()
    shutil.copy(ext4_image, root / "fs.img")
    with nginx(base / "nginx", root, tls=True) as srv:
        yield Served(srv, root, base / "nginx" / "ca" / "ca.pem")


def read_back(mnt: Path, src: Path) -> tuple[list[str], list[str]]:
    """(files whose bytes differ from the source, files that failed with EIO)."""
    wrong, eio = [], []
    for f in regular_files(src):
        rel = f.relative_to(src)
        try:
            got = (mnt / rel).read_bytes()
        except OSError as err:
            assert err.errno == errno.EIO, (rel, err)
            eio.append(str(rel))
            continue
        if got != f.read_bytes():
            wrong.append(str(rel))
    return wrong, eio


def test_http_through_a_slow_link_matches_a_local_mount(
    served: Served, ext4_image: Path, small_tree: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Over a 10 ms round trip, every field of every file (inode numbers, times, xattrs,
    bytes) equals a local mount of the same image; `asyncfs stats` has the remote line."""
    with delay_proxy(served.srv.port, rtt_ms=10) as port, \
            mounted(ext4_image, tmp_path / "local") as local, \
            mounted(f"http://127.0.0.1:{port}/img/fs.img", tmp_path / "remote") as remote:
        assert compare_trees(local, remote, fields=ALL_FIELDS) == []
        assert compare_trees(small_tree, remote, fields=SOURCE) == []
        r = stats(remote)["remote"]
        assert r["requests"] > 1 and r["bytes_fetched"] > 0 and r["requests_inflight"] == 0
        assert r["latency_ms_p50"] >= 10 and r["object_changed"] is None
        assert main(["stats", str(remote)]) == 0
        text = capsys.readouterr().out
        assert "\nremote    http://127.0.0.1:" in text and "fetched in" in text


def test_https_with_a_test_ca_and_the_refusals(served: Served, small_tree: Path,
                                               tmp_path: Path) -> None:
    """TLS is verified by default (the test's CA is unknown: refused in one line), trusted
    with -o cafile=, skipped with -o insecure; a server that ignores Range and a redirect loop
    are refused in one line each."""
    url = served.srv.url("fs.img", tls=True)
    with mounted(url, tmp_path / "m", f"cafile={served.ca}") as mnt:
        assert compare_trees(small_tree, mnt, fields=SOURCE) == []
    with mounted(url, tmp_path / "m", "insecure") as mnt:
        assert set(os.listdir(mnt)) == set(os.listdir(small_tree)) | {"lost+found"}
    (tmp_path / "m2").mkdir()
    r = run_asyncfs("mount", url, str(tmp_path / "m2"))
    assert r.returncode == 1, r
    assert "TLS certificate verify failed" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    cases = [
        (served.srv.url("fs.img", "noranges"), "does not support range requests"),
        (f"http://127.0.0.1:{served.srv.port}/loop", "redirect loop"),
        (served.srv.url("missing.img"), "HTTP 404"),
    ]
    for image, want in cases:  # (the same path as the mount's, without a process each)
        with pytest.raises(ImageError, match=want) as err:
            trio.run(partial(open_image, image, remote=RemoteOptions(retries=1)))
        assert "\n" not in str(err.value)


def test_basic_auth_by_header_or_netrc(served: Served, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that wants HTTP basic auth: refused in one line without credentials, read
    with ``-o header=Authorization: ...`` or with a netrc entry for the host."""
    url = served.srv.url("fs.img", "private")
    srv = served.srv

    def size_with(opts: RemoteOptions) -> int:
        async def run() -> int:
            dev = await open_image(url, remote=opts)
            try:
                return dev.size
            finally:
                await dev.aclose()
        return trio.run(run)

    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(ImageError, match="HTTP 401"):
        size_with(RemoteOptions(retries=1))
    token = base64.b64encode(f"{srv.USER}:{srv.PASSWORD}".encode()).decode()
    want = (served.root / "fs.img").stat().st_size
    assert size_with(RemoteOptions(headers=[("Authorization", f"Basic {token}")])) == want
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {srv.USER} password {srv.PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert size_with(RemoteOptions()) == want


def _gpt_disk(path: Path, fs_image: Path) -> None:
    """Partition 1 empty, partition 2 a copy of ``fs_image``."""
    part2 = -(-fs_image.stat().st_size // MIB)
    with open(path, "wb") as f:
        f.truncate((1 + 4 + part2 + 1) * MIB)
    subprocess.run(["sfdisk", "-q", str(path)], check=True, capture_output=True, text=True,
                   input=f"label: gpt\nsize=4MiB, type=L\nsize={part2}MiB, type=L\n")
    table = json.loads(subprocess.run(["sfdisk", "--json", str(path)], check=True,
                                      capture_output=True, text=True).stdout)
    start = table["partitiontable"]["partitions"][1]["start"] * 512
    subprocess.run(["dd", f"if={fs_image}", f"of={path}", "bs=1M", f"seek={start}",
                    "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"], check=True)


def test_partition_of_a_whole_disk_image_over_http(served: Served, ext4_image: Path,
                                                   small_tree: Path, tmp_path: Path) -> None:
    _gpt_disk(served.root / "disk.img", ext4_image)
    with mounted(served.srv.url("disk.img"), tmp_path / "m", "partition=2") as mnt:
        assert compare_trees(small_tree, mnt, fields=SOURCE) == []


def test_qcow2_image_over_http(served: Served, ext4_image: Path, small_tree: Path,
                               tmp_path: Path) -> None:
    """The format layer works over the remote transport as over a file: a qcow2 image served
    by nginx mounts as its guest disk."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (Debian package qemu-utils)")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(ext4_image),
                    str(served.root / "fs.qcow2")], check=True, capture_output=True)
    with mounted(served.srv.url("fs.qcow2"), tmp_path / "m") as mnt:
        assert compare_trees(small_tree, mnt, fields=SOURCE) == []


def _other_version(src: Path, dst: Path, img: Path) -> None:
    """The same tree with every file's bytes changed (same sizes): an image whose layout
    matches, so a read that mixed versions would return plausible wrong bytes."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    flip = bytes(b ^ 0x5A for b in range(256))
    for f in regular_files(dst):
        if f.stat().st_size <= 256 * 1024:  # (the large ones are sparse: keep their holes)
            data = f.read_bytes()
            f.chmod(0o644)
            f.write_bytes(data.translate(flip))
    make_image(dst, img, "ext4", size=f"{os.path.getsize(img) // 1024}k")


def test_object_replaced_during_the_mount(served: Served, small_tree: Path,
                                          tmp_path: Path) -> None:
    """nginx serves a new version (new ETag) half-way: files read before still read right
    (cached), every other read is the old bytes or EIO, never the new version's; the daemon
    logs why and `asyncfs stats` shows it."""
    new = tmp_path / "new.img"
    shutil.copy(served.root / "fs.img", new)  # (for its size)
    _other_version(small_tree, tmp_path / "tree2", new)
    shutil.copy(served.root / "fs.img", served.root / "chg.img")
    # a few files only before the change: the read-around of small misses would otherwise
    # have brought in most of this small image already
    first = [f for f in regular_files(small_tree) if f.stat().st_size <= 64 * 1024][-3:]
    with mounted(served.srv.url("chg.img"), tmp_path / "m", "retries=2",
                 "readahead=0") as mnt:
        for f in first:
            assert (mnt / f.relative_to(small_tree)).read_bytes() == f.read_bytes()
        tmp = served.root / "chg.tmp"
        shutil.copy(new, tmp)
        os.utime(tmp, (time.time() + 100, time.time() + 100))
        os.replace(tmp, served.root / "chg.img")
        wrong, eio = read_back(mnt, small_tree)
        s = stats(mnt)
        log = Path(s["log"]).read_text()
    assert wrong == []
    assert eio, "no read needed the server after the change"
    assert "changed since it was mounted" in str(s["remote"]["object_changed"])
    assert "changed since it was mounted" in log


def test_503_for_a_while_then_a_killed_server(ext4_image: Path, small_tree: Path,
                                              tmp_path: Path) -> None:
    """503s for 0.3 s are retried and the read gets its bytes; with the server
    killed a read fails with EIO (after its retries); once the server is back the same read
    gets the right bytes. No wrong byte at any point."""
    require_fuse()
    if nginx_missing():
        pytest.skip(str(nginx_missing()))
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ext4_image, root / "fs.img")
    files = [f for f in regular_files(small_tree) if f.stat().st_size > 0]
    with nginx(tmp_path / "nginx", root) as srv, \
            mounted(srv.url("fs.img", "flaky"), tmp_path / "m", "retries=5",
                    "readahead=0") as mnt:
        srv.flag.touch()
        threading.Timer(0.3, srv.flag.unlink).start()
        big = files[0]
        assert (mnt / big.relative_to(small_tree)).read_bytes() == big.read_bytes()
        assert stats(mnt)["remote"]["retries"] >= 1
        srv.kill()
        wrong, eio = read_back(mnt, small_tree)  # (what is cached still reads right)
        assert wrong == [] and eio
        srv.start()
        wrong, eio = read_back(mnt, small_tree)
        assert wrong == [] and eio == []


def test_cache_dir_warm_second_mount_and_a_corrupt_cache(served: Served, small_tree: Path,
                                                         tmp_path: Path) -> None:
    """The second mount of the same object reads the whole tree with no GET but the first;
    a cache damaged on disk is detected by its checksums, dropped, and the bytes fetched
    again."""
    cache = tmp_path / "cache"
    url = served.srv.url("fs.img")
    opt = f"cache_dir={cache}"
    with mounted(url, tmp_path / "m", opt) as mnt:
        assert read_back(mnt, small_tree) == ([], [])
        assert stats(mnt)["remote"]["disk_cache_stored"] > 0
    with mounted(url, tmp_path / "m", opt) as mnt:
        assert read_back(mnt, small_tree) == ([], [])
        r = stats(mnt)["remote"]
        assert r["requests"] == 1 and r["disk_cache_hits"] > 0  # (the first GET: the pin)
    (obj,) = [d for d in cache.iterdir() if d.is_dir()]
    data = bytearray((obj / "data").read_bytes())
    for off in range(65536 + 100, len(data), 65536):
        data[off] ^= 0xFF
    (obj / "data").write_bytes(bytes(data))
    with mounted(url, tmp_path / "m", opt) as mnt:
        assert read_back(mnt, small_tree) == ([], [])
        assert stats(mnt)["remote"]["disk_cache_dropped"] >= 1


def _tiny(tmp_path: Path) -> tuple[Path, Path]:
    """A small tree and its image (moto keeps objects in memory: a big one costs seconds)."""
    src = tmp_path / "tiny"
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "lost+found").mkdir()
    for i, size in enumerate((0, 1, 4095, 4096, 70_000, 300_001)):
        (src / "dir" / f"f{i}").write_bytes(os.urandom(size))
    (src / "dir" / "sub" / "hello").write_text("hello\n")
    (src / "link").symlink_to("dir/sub/hello")
    return src, make_image(src, tmp_path / "tiny.img", "ext4", size="4M")


def test_s3_object_and_a_presigned_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`s3://BUCKET/KEY` with credentials from the environment and -o endpoint=, signed
    and checked by moto; a presigned URL of the same object mounts as a plain https URL
    would (through the HTTP path; moto checks no signature there)."""
    require_fuse()
    if moto_missing():
        pytest.skip(str(moto_missing()))
    import botocore.session
    from botocore.config import Config

    small_tree, image = _tiny(tmp_path)
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"}]})
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with moto(tmp_path / "moto.log", no_auth_actions=3) as srv:
        boot = botocore.session.Session()
        boot.set_credentials("AKIDBOOT", "boot")
        iam = boot.create_client("iam", endpoint_url=srv.endpoint, region_name="us-east-1")
        iam.create_user(UserName="u")
        iam.put_user_policy(UserName="u", PolicyName="all", PolicyDocument=policy)
        key = iam.create_access_key(UserName="u")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        sess = botocore.session.Session()
        s3 = sess.create_client("s3", endpoint_url=srv.endpoint, region_name="us-east-1",
                                config=Config(signature_version="s3v4"))
        s3.create_bucket(Bucket="asyncfs-images")
        s3.put_object(Bucket="asyncfs-images", Key="img/fs.img", Body=image.read_bytes())
        with mounted("s3://asyncfs-images/img/fs.img", tmp_path / "m",
                     f"endpoint={srv.endpoint}") as mnt:
            assert compare_trees(small_tree, mnt, fields=SOURCE) == []
            assert stats(mnt)["remote"]["url"] == "s3://asyncfs-images/img/fs.img"
    with moto(tmp_path / "moto2.log") as srv:  # no authentication: presigned URLs pass
        s3 = sess.create_client("s3", endpoint_url=srv.endpoint, region_name="us-east-1",
                                config=Config(signature_version="s3v4"))
        s3.create_bucket(Bucket="asyncfs-images")
        s3.put_object(Bucket="asyncfs-images", Key="fs.img", Body=image.read_bytes())
        url = s3.generate_presigned_url("get_object", ExpiresIn=600,
                                        Params={"Bucket": "asyncfs-images", "Key": "fs.img"})
        assert "X-Amz-Signature=" in url
        with mounted(url, tmp_path / "m") as mnt:
            assert compare_trees(small_tree, mnt, fields=SOURCE) == []
            assert "X-Amz-Signature" not in json.dumps(stats(mnt))
            with open("/proc/self/mountinfo") as f:
                assert "X-Amz-Signature" not in f.read()
