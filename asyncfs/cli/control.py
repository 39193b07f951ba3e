"""The stats channel: a Unix socket per mount, outside the mounted tree.

The daemon listens on ``<runtime dir>/<hash of the mount point>.sock`` and answers every
connection with one JSON object; ``asyncfs stats`` connects and prints it. Keeping the channel
off the mount means the tree stays byte-for-byte the image's (no magic files or xattrs).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from asyncfs.errors import MountPointError


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/asyncfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "asyncfs" if xdg else Path(f"/tmp/asyncfs-{os.geteuid()}")


def mount_key(mountpoint: str) -> str:
    """Key of a canonical (absolute, symlink-free) mount point. The daemon must never resolve
    its own mount point: an lstat of it would be a FUSE request to itself before it serves."""
    return hashlib.sha256(mountpoint.encode()).hexdigest()[:16]


def socket_path(mountpoint: str) -> Path:
    return runtime_dir() / f"{mount_key(mountpoint)}.sock"


def log_path(mountpoint: str) -> Path:
    return runtime_dir() / f"{mount_key(mountpoint)}.log"


async def serve_stats(path: Path, snapshot: Callable[[], dict[str, Any]],
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer each connection on ``path`` with ``snapshot()`` as one JSON line."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
                payload = json.dumps(snapshot(), sort_keys=True).encode() + b"\n"
                try:
                    await conn.send(payload)
                except OSError:
                    pass
    finally:
        sock.close()
        try:
            path.unlink()
        except OSError:
            pass


def fetch_stats(mountpoint: str, timeout: float = 5.0) -> dict[str, Any]:
    """Client side (plain blocking socket: the CLI has no event loop to protect)."""
    path = socket_path(os.path.realpath(mountpoint))
    if not path.exists():
        raise MountPointError(f"{mountpoint} is not an asyncfs mount (no stats socket {path})")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(path))
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
    return data
