"""Mounting as an ordinary user: the mount goes through fusermount3, reads are served to that
user, `asyncfs stats` finds the daemon under the user's XDG_RUNTIME_DIR, `fusermount3 -u`
ends it; and what fusermount3 would refuse (allow_other without user_allow_other, a
/dev/fuse the user cannot open, a mount point it does not own) is one line saying so.

The tests run as root and act as a system user ``asyncfs-test`` (created if missing and
removed again; an existing one is reused). /dev/fuse is made 0666 as Debian ships it and
/etc/fuse.conf is rewritten for two tests; both are restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from asyncfs.cli.control import mount_key
from asyncfs.testing.imagegen import make_image
from tests.mount.helpers import is_mounted, require_fuse, unmount, wait_gone

USER = "asyncfs-test"
REPO = Path(__file__).resolve().parents[2]
FUSE_CONF = Path("/etc/fuse.conf")
FUSE_DEVICE = Path("/dev/fuse")


@dataclass
class User:
    """The unprivileged user, its files, and a Python it can run asyncfs with."""

    name: str
    uid: int
    gid: int
    base: Path  # 0755, under /tmp: reachable by the user (pytest's own tmp dirs are 0700)
    tree: Path
    image: Path
    python: list[str]  # interpreter and its environment, as `env` arguments

    def env(self, xdg: Path | None) -> list[str]:
        env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE=1"]
        if xdg is not None:
            env.append(f"XDG_RUNTIME_DIR={xdg}")
        return env

    def run(self, *cmd: str, xdg: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", self.name, "--", *self.env(xdg), *cmd],
                              capture_output=True, text=True, timeout=timeout)

    def asyncfs(self, *args: str, xdg: Path | None) -> subprocess.CompletedProcess[str]:
        env = self.env(xdg)
        return subprocess.run(["runuser", "-u", self.name, "--", *env, *self.python,
                               "-m", "asyncfs", *args],
                              capture_output=True, text=True, timeout=60)

    def read(self, path: Path) -> bytes:
        r = subprocess.run(["runuser", "-u", self.name, "--", "cat", str(path)],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def own_dir(self, path: Path, mode: int = 0o755) -> Path:
        path.mkdir()
        os.chown(path, self.uid, self.gid)
        os.chmod(path, mode)
        return path


def _write_tree(root: Path) -> None:
    rng = random.Random(11)
    root.mkdir()
    (root / "lost+found").mkdir(mode=0o700)
    for size in (0, 1, 4095, 4096, 4097, 70_000, 3 << 20):
        (root / f"f{size}").write_bytes(rng.randbytes(size))
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "note.txt").write_text("read by an ordinary user\n")
    (root / "sub" / "link").symlink_to("deeper/note.txt")
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink() and p.name != "lost+found":
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


def _python_for(user: str, uid: int) -> list[str]:
    """A Python the user can run asyncfs with: this venv's, else the system's Python of the
    same version with this venv's packages and the checkout on PYTHONPATH (a venv built from
    an interpreter under /root, as pyenv makes them, cannot be run by anyone else)."""
    probe = "import asyncfs.cli.main, pyfuse3, trio"
    purelib, platlib = sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]
    path = os.pathsep.join(dict.fromkeys([str(REPO), purelib, platlib]))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [[sys.executable]]
    for exe in (f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.path.exists(exe):
            candidates.append([f"PYTHONPATH={path}", exe])
    tried = []
    for cand in candidates:
        r = subprocess.run(["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin",
                            *cand, "-c", probe], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return cand
        tried.append(f"{' '.join(cand)}: {r.stderr.strip().splitlines()[-1:]}")
    pytest.fail(f"no Python that user {user} (uid {uid}) can run asyncfs with; make the venv's "
                f"interpreter and {REPO} readable by others, or install {version}. "
                f"Tried: {'; '.join(tried)}")


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    if os.geteuid() != 0:
        reason = "needs root: the test creates a user and acts as it"
        print(reason)
        pytest.skip(reason)
    require_fuse()
    created = False
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", USER], check=True, capture_output=True)
        created = True
        pw = pwd.getpwnam(USER)
    base = Path(tempfile.mkdtemp(prefix="asyncfs-nonroot-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        tree = base / "src"
        _write_tree(tree)
        image = make_image(tree, base / "fs.img", "ext4", size="16M")
        os.chmod(image, 0o644)
        yield User(USER, pw.pw_uid, pw.pw_gid, base, tree, image,
                   _python_for(USER, pw.pw_uid))
    finally:
        for mnt in base.glob("mnt-*"):
            unmount(mnt)
        shutil.rmtree(base, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(f"/tmp/asyncfs-{pw.pw_uid}")
        if created:
            subprocess.run(["userdel", USER], capture_output=True)


@contextlib.contextmanager
def _fuse_device_mode(mode: int) -> Iterator[None]:
    before = stat.S_IMODE(FUSE_DEVICE.stat().st_mode)
    os.chmod(FUSE_DEVICE, mode)
    try:
        yield
    finally:
        os.chmod(FUSE_DEVICE, before)


@pytest.fixture(scope="module", autouse=True)
def fuse_device_for_users(user: User) -> Iterator[None]:
    """/dev/fuse as Debian ships it (0666): what lets fusermount3 serve ordinary users."""
    with _fuse_device_mode(0o666):
        yield


@pytest.fixture
def fuse_conf() -> Iterator[Path]:
    """/etc/fuse.conf, restored (content and mode, or absence) after the test."""
    before = FUSE_CONF.read_bytes() if FUSE_CONF.exists() else None
    mode = stat.S_IMODE(FUSE_CONF.stat().st_mode) if before is not None else 0o644
    try:
        yield FUSE_CONF
    finally:
        if before is None:
            FUSE_CONF.unlink(missing_ok=True)
        else:
            FUSE_CONF.write_bytes(before)
            os.chmod(FUSE_CONF, mode)


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("asyncfs: "), lines
    for n in needles:
        assert n in lines[0], lines[0]


def _daemon_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _mount_options(mnt: Path) -> tuple[str, str]:
    """(fstype, superblock options) of the mount at ``mnt``, from mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(mnt):
                fields = right.split()
                return fields[0], fields[2]
    raise AssertionError(f"{mnt} is not mounted")


def _user_files(user: User) -> list[Path]:
    return [p.relative_to(user.tree) for p in sorted(user.tree.rglob("*"))
            if p.is_file() and not p.is_symlink()]


def test_user_mount_reads_stats_and_unmounts(user: User) -> None:
    """The runtime directory is 0700 (the socket that takes fault injection is out of
    others' reach) and the socket and log are under XDG_RUNTIME_DIR."""
    mnt = user.own_dir(user.base / "mnt-plain")
    xdg = user.own_dir(user.base / "run-plain", 0o700)
    r = user.asyncfs("mount", str(user.image), str(mnt), xdg=xdg)
    assert r.returncode == 0, r.stderr
    try:
        fstype, sbopts = _mount_options(mnt)
        assert fstype == "fuse.asyncfs"
        assert f"user_id={user.uid}" in sbopts.split(",")  # mounted by fusermount3 for it
        for rel in _user_files(user):
            assert user.read(mnt / rel) == (user.tree / rel).read_bytes(), rel
        assert user.read(mnt / "sub" / "link") == b"read by an ordinary user\n"
        with pytest.raises(PermissionError):  # no allow_other: not even root gets in
            os.stat(mnt / "f4096")

        s = user.asyncfs("stats", str(mnt), "--json", xdg=xdg)
        assert s.returncode == 0, s.stderr
        data = json.loads(s.stdout)
        assert data["mountpoint"] == str(mnt)
        assert _daemon_uid(int(data["pid"])) == user.uid
        rundir = xdg / "asyncfs"
        key = mount_key(str(mnt))
        assert data["log"] == str(rundir / f"{key}.log")
        st = rundir.lstat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == user.uid
        sock = (rundir / f"{key}.sock").lstat()
        assert stat.S_ISSOCK(sock.st_mode) and sock.st_uid == user.uid
        log = (rundir / f"{key}.log").lstat()
        assert log.st_uid == user.uid and stat.S_IMODE(log.st_mode) == 0o600
        assert "mounted" in (rundir / f"{key}.log").read_text()
        human = user.asyncfs("stats", str(mnt), xdg=xdg)
        assert human.returncode == 0 and f"log: {rundir}" in human.stdout, human.stderr

        u = user.run("fusermount3", "-u", str(mnt))
        assert u.returncode == 0, u.stderr
        assert wait_gone(int(data["pid"]))
        assert not is_mounted(mnt)
        assert not (rundir / f"{key}.sock").exists()
    finally:
        unmount(mnt)


def test_runtime_dir_without_xdg_is_private_and_checked(user: User) -> None:
    """No XDG_RUNTIME_DIR: /tmp/asyncfs-UID, made 0700, tightened if it is open, and refused if
    it belongs to someone else (who could read the log and reach the socket), never taken
    as it is."""
    mnt = user.own_dir(user.base / "mnt-noxdg")
    fallback = Path(f"/tmp/asyncfs-{user.uid}")
    shutil.rmtree(fallback, ignore_errors=True)
    try:
        fallback.mkdir(mode=0o755)
        os.chmod(fallback, 0o755)
        os.chown(fallback, 0, 0)
        _one_line_error(user.asyncfs("mount", str(user.image), str(mnt), xdg=None),
                        str(fallback), "belongs to uid 0")
        assert not is_mounted(mnt)

        os.chown(fallback, user.uid, user.gid)  # the user's own, but open to everyone
        r = user.asyncfs("mount", str(user.image), str(mnt), xdg=None)
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(fallback.lstat().st_mode) == 0o700
        assert (fallback / f"{mount_key(str(mnt))}.sock").exists()
        s = user.asyncfs("stats", str(mnt), "--json", xdg=None)
        assert s.returncode == 0, s.stderr
        assert json.loads(s.stdout)["log"].startswith(f"{fallback}/")
        assert user.read(mnt / "f70000") == (user.tree / "f70000").read_bytes()
        assert user.run("fusermount3", "-u", str(mnt)).returncode == 0
    finally:
        unmount(mnt)
        shutil.rmtree(fallback, ignore_errors=True)


@pytest.mark.parametrize("flag", ["allow_other", "allow_root"])
def test_allow_other_without_user_allow_other(user: User, fuse_conf: Path, flag: str) -> None:
    """fuse.conf with the line commented out, as Debian ships it: one line naming the fix.
    Without the check before the fork the user would see only pyfuse3's
    "fuse_session_mount failed"."""
    fuse_conf.write_text("# mount_max = 1000\n#user_allow_other\n  # user_allow_other\n")
    mnt = user.own_dir(user.base / f"mnt-{flag}-refused")
    xdg = user.own_dir(user.base / f"run-{flag}-refused", 0o700)
    _one_line_error(user.asyncfs("mount", str(user.image), str(mnt), "-o", flag, xdg=xdg),
                    f"{flag} needs 'user_allow_other' in /etc/fuse.conf (or mount as root)")
    assert not is_mounted(mnt)


def test_allow_other_with_user_allow_other(user: User, fuse_conf: Path) -> None:
    """With the line (indented, with a comment after it, as fusermount3 accepts it) the mount
    is made with allow_other: root, another user, reads it."""
    fuse_conf.write_text("# asyncfs test\n  user_allow_other   # let users share mounts\n")
    mnt = user.own_dir(user.base / "mnt-allow-other")
    xdg = user.own_dir(user.base / "run-allow-other", 0o700)
    r = user.asyncfs("mount", str(user.image), str(mnt), "-o", "allow_other", xdg=xdg)
    assert r.returncode == 0, r.stderr
    try:
        assert "allow_other" in _mount_options(mnt)[1].split(",")
        assert (mnt / "f4097").read_bytes() == (user.tree / "f4097").read_bytes()
        assert user.read(mnt / "f4097") == (user.tree / "f4097").read_bytes()
        assert user.run("fusermount3", "-u", str(mnt)).returncode == 0
    finally:
        unmount(mnt)


def test_dev_fuse_closed_to_users(user: User) -> None:
    """/dev/fuse 0600 (root only): one line that names the device and its mode."""
    mnt = user.own_dir(user.base / "mnt-nodev")
    xdg = user.own_dir(user.base / "run-nodev", 0o700)
    with _fuse_device_mode(0o600):
        _one_line_error(user.asyncfs("mount", str(user.image), str(mnt), xdg=xdg),
                        "/dev/fuse is not read-writable by you (mode 0600)")
    assert not is_mounted(mnt)


def test_fusermount3_refusal_is_explained(user: User) -> None:
    """A mount point asyncfs's own checks pass (writable by the user) but fusermount3 refuses
    (sticky and not the user's): the error carries fusermount3's reason, which the daemon's
    stderr (its log) caught; with the daemon's stderr on /dev/null only
    "fuse_session_mount failed" would show."""
    mnt = user.base / "mnt-sticky"
    mnt.mkdir()
    os.chmod(mnt, 0o1777)
    xdg = user.own_dir(user.base / "run-sticky", 0o700)
    _one_line_error(user.asyncfs("mount", str(user.image), str(mnt), xdg=xdg),
                    f"cannot mount on {mnt}", f"(fusermount3: mountpoint {mnt} not owned by user)")
    time.sleep(0.1)
    assert not is_mounted(mnt)


@contextlib.contextmanager
def _helper_the_user_can_run(user: User) -> Iterator[None]:
    """/sbin/mount.fuse.asyncfs, runnable by the user. The installed link is used as it is when
    the user can run this venv's interpreter; otherwise (a venv built on an interpreter under
    /root) the link is swapped, for the test only, for a script that runs the same helper
    module with the Python ``_python_for`` found, and put back afterwards."""
    from tests.mount.test_fstab import HELPER_LINK, ensure_helper

    ensure_helper()
    if user.python == [sys.executable]:
        yield
        return
    original = os.readlink(HELPER_LINK)
    script = user.base / "mount.fuse.asyncfs"
    script.write_text("#!/bin/sh\nexec env " + " ".join(user.python)
                      + ' -m asyncfs.cli.mounthelper "$@"\n')
    os.chmod(script, 0o755)
    swapped = HELPER_LINK.with_name(HELPER_LINK.name + ".test")
    swapped.symlink_to(script)
    os.replace(swapped, HELPER_LINK)
    try:
        yield
    finally:
        swapped.unlink(missing_ok=True)
        swapped.symlink_to(original)
        os.replace(swapped, HELPER_LINK)


@pytest.fixture
def fstab() -> Iterator[Path]:
    """/etc/fstab, restored byte for byte after the test."""
    path = Path("/etc/fstab")
    before = path.read_bytes()
    try:
        yield path
    finally:
        path.write_bytes(before)


def test_fstab_user_line_mounts_as_the_user(user: User, fstab: Path) -> None:
    """An fstab line with ``user``: the user runs `mount MNT`, mount(8) runs the helper as that
    user (with ``noexec,nosuid,nodev`` added and ``user`` still in the options), the mount goes
    through fusermount3, and the user's `umount` ends it. The helper keeps ``user`` from
    asyncfs's parser ("unknown mount option: user" otherwise; the option filter is unit
    tested in tests/unit/test_cli_options.py)."""
    mnt = user.own_dir(user.base / "mnt-fstab")
    xdg = user.own_dir(user.base / "run-fstab", 0o700)
    with fstab.open("a") as f:
        f.write(f"\n{user.image} {mnt} fuse.asyncfs ro,noauto,user,cache_size=32M 0 0\n")
    with _helper_the_user_can_run(user):
        r = user.run("mount", str(mnt), xdg=xdg)
    assert r.returncode == 0, r.stderr
    try:
        fstype, sbopts = _mount_options(mnt)
        assert fstype == "fuse.asyncfs" and f"user_id={user.uid}" in sbopts.split(",")
        with open("/proc/self/mountinfo") as m:
            line = next(ln for ln in m if ln.split()[4] == str(mnt))
        assert {"nosuid", "nodev", "noexec"} <= set(line.split()[5].split(","))
        for rel in _user_files(user):
            assert user.read(mnt / rel) == (user.tree / rel).read_bytes(), rel
        s = user.asyncfs("stats", str(mnt), "--json", xdg=xdg)
        assert s.returncode == 0, s.stderr
        data = json.loads(s.stdout)
        assert data["cache_max_bytes"] == 32 << 20
        assert _daemon_uid(int(data["pid"])) == user.uid
        u = user.run("umount", str(mnt))
        assert u.returncode == 0, u.stderr
        assert wait_gone(int(data["pid"]))
        assert not is_mounted(mnt)
    finally:
        unmount(mnt)
