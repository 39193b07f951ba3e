"""The control channel: a Unix socket per mount, outside the mounted tree.

The daemon listens on ``<runtime dir>/<hash of the mount point>.sock``. A client sends one JSON
request line and gets one JSON object back: ``{"op": "stats"}`` (what ``asyncfs stats`` prints)
or, on a mount with ``-o faults``, ``{"op": "fault", "action": "eio"|"clear"|"stall"|"release",
...}`` (what ``asyncfs fault`` sends, for tests and benchmarks). Keeping the channel off the
mount means the tree stays byte-for-byte the image's (no magic files or xattrs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from asyncfs.errors import AsyncfsError, MountPointError, UsageError


def runtime_dir() -> Path:
    """Where the sockets and logs of this user's mounts live. An ordinary user's go under
    ``$XDG_RUNTIME_DIR`` (per user, mode 0700, emptied at logout) when it is set to an
    absolute path, as the XDG base directory rules ask; without one, under /tmp, where
    ``ensure_runtime_dir`` guards against a directory planted by someone else."""
    if os.geteuid() == 0:
        return Path("/run/asyncfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    return Path(xdg) / "asyncfs" if os.path.isabs(xdg) else Path(f"/tmp/asyncfs-{os.geteuid()}")


def ensure_runtime_dir() -> Path:
    """Create the runtime directory (mode 0700) or check the one that is there: it must be a
    real directory of this user, since the control socket in it accepts fault injection and
    the log in it names the images mounted. A group- or world-accessible one of ours is
    tightened (an older asyncfs, or a umask, may have made it so)."""
    d = runtime_dir()
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = d.lstat()
    except OSError as e:
        raise MountPointError(f"cannot create the runtime directory {d}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountPointError(f"the runtime directory {d} is not a directory")
    if st.st_uid != os.geteuid():
        raise MountPointError(
            f"the runtime directory {d} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.geteuid()}); remove it or set XDG_RUNTIME_DIR"
        )
    if st.st_mode & 0o077:
        try:
            os.chmod(d, 0o700)
        except OSError as e:
            raise MountPointError(f"cannot make {d} private (mode 0700): {e.strerror}") from None
    return d


def mount_key(mountpoint: str) -> str:
    """Key of a canonical (absolute, symlink-free) mount point. The daemon must never resolve
    its own mount point: an lstat of it would be a FUSE request to itself before it serves."""
    return hashlib.sha256(mountpoint.encode()).hexdigest()[:16]


def socket_path(mountpoint: str) -> Path:
    return runtime_dir() / f"{mount_key(mountpoint)}.sock"


def log_path(mountpoint: str) -> Path:
    return runtime_dir() / f"{mount_key(mountpoint)}.log"


log = logging.getLogger("asyncfs.control")

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST = 4096


async def _read_request(conn: trio.socket.SocketType) -> dict[str, Any]:
    buf = b""
    with trio.move_on_after(2):
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            chunk = await conn.recv(MAX_REQUEST)
            if not chunk:
                break
            buf += chunk
    try:
        req = json.loads(buf.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        return {"op": "invalid"}
    return req if isinstance(req, dict) else {"op": "invalid"}


async def serve_control(path: Path, handle: Handler,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer each connection on ``path``: one JSON request line in, one JSON line out.
    Connections are served one at a time; each is bounded by a short timeout."""
    ensure_runtime_dir()
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
        sock.listen(16)
        task_status.started()
        while True:
            conn, _ = await sock.accept()
            with conn:
                try:
                    req = await _read_request(conn)
                    try:
                        reply = handle(req)
                    except AsyncfsError as e:
                        reply = {"error": str(e)}
                    except Exception as e:  # a control bug must never take the mount down
                        log.exception("control request %r failed", req)
                        reply = {"error": f"internal error: {type(e).__name__}: {e}"}
                    payload = json.dumps(reply, sort_keys=True).encode() + b"\n"
                    with trio.move_on_after(2):
                        await conn.send(payload)
                except OSError:
                    pass
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()


def fetch_stats(mountpoint: str, timeout: float = 5.0) -> dict[str, Any]:
    """The daemon's counters."""
    return request(mountpoint, {"op": "stats"}, timeout)


def request(mountpoint: str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Client side (plain blocking socket: the CLI has no event loop to protect)."""
    path = socket_path(os.path.realpath(mountpoint))
    if not path.exists():
        raise MountPointError(f"{mountpoint} is not an asyncfs mount (no stats socket {path})")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(path))
            s.sendall(json.dumps(req).encode() + b"\n")
            chunks = []
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError as e:
            raise MountPointError(f"cannot reach the asyncfs daemon of {mountpoint}: {e}") from None
    try:
        data = json.loads(b"".join(chunks))
    except ValueError:
        raise MountPointError(f"the asyncfs daemon of {mountpoint} sent no stats") from None
    if not isinstance(data, dict):
        raise MountPointError(f"the asyncfs daemon of {mountpoint} sent no stats")
    if "error" in data:
        raise UsageError(str(data["error"]))
    return data
