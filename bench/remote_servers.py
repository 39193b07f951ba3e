"""Real servers on loopback for the remote-image tests and bench/remote_bench.py: nginx (the
data-path reference, with Range), a self-signed CA for its TLS port, the delay proxy
(``bench/netproxy.py``) and moto's standalone S3 server. Each runs as a child process on
127.0.0.1 with a free port and is killed by its owner.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
              ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def nginx_missing() -> str | None:
    return None if shutil.which("nginx") else "nginx is not installed (Debian package nginx)"


def make_ca(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it, with the openssl
    CLI: (ca.pem, server.pem, server.key)."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, crt = (d / n for n in ("ca.key", "ca.pem", "server.key",
                                                  "server.csr", "server.pem"))
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
        str(ca), "-days", "2", "-subj", "/CN=asyncfs test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext))
    return ca, crt, key


@dataclass
class Nginx:
    """nginx serving ``root`` on ``port`` (plain) and ``tls_port`` (TLS, if certs given).

    Locations: ``/img/NAME`` the files with Range; ``/noranges/NAME`` the same without Range
    (``max_ranges 0``: a 200 with the whole file); ``/compat/NAME`` the files with an
    ``Accept-Ranges`` header on every answer (httpfs2 looks for it, or for a Content-Range that
    is not the last header line); ``/private/NAME`` needs HTTP basic auth as
    ``USER``:``PASSWORD``; ``/flaky/NAME`` answers 503 while the file
    ``fail503`` exists in the prefix; ``/loop`` redirects forever."""

    prefix: Path
    root: Path
    port: int
    tls_port: int | None
    proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str, where: str = "img", tls: bool = False) -> str:
        if tls:
            return f"https://127.0.0.1:{self.tls_port}/{where}/{name}"
        return f"http://127.0.0.1:{self.port}/{where}/{name}"

    @property
    def flag(self) -> Path:
        return self.prefix / "fail503"

    def conf(self, cert: tuple[Path, Path] | None) -> str:
        p, r = self.prefix, self.root
        tls = ""
        if cert is not None and self.tls_port:
            tls = (f"server {{ listen 127.0.0.1:{self.tls_port} ssl; "
                   f"ssl_certificate {cert[0]}; ssl_certificate_key {cert[1]}; "
                   f"location /img/ {{ alias {r}/; }} }}")
        return f"""
daemon off;
master_process off;
user root;
error_log {p}/error.log warn;
pid {p}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {p}/body; proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fcgi; uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;
  keepalive_requests 100000;
  sendfile on;
  server {{
    listen 127.0.0.1:{self.port};
    location /img/ {{ alias {r}/; }}
    location /noranges/ {{ alias {r}/; max_ranges 0; }}
    location /compat/ {{ alias {r}/; add_header Accept-Ranges bytes; }}
    location /private/ {{
      alias {r}/; auth_basic "asyncfs"; auth_basic_user_file {p}/htpasswd;
    }}
    location /flaky/ {{
      if (-f {p}/fail503) {{ return 503; }}
      alias {r}/;
    }}
    location = /loop {{ return 302 /loop2; }}
    location = /loop2 {{ return 302 /loop; }}
  }}
  {tls}
}}
"""

    USER = "reader"
    PASSWORD = "s3cret-pass"

    def start(self, cert: tuple[Path, Path] | None = None) -> None:
        (self.prefix / "conf").mkdir(parents=True, exist_ok=True)
        hashed = subprocess.run(["openssl", "passwd", "-apr1", self.PASSWORD], check=True,
                                capture_output=True, text=True).stdout.strip()
        (self.prefix / "htpasswd").write_text(f"{self.USER}:{hashed}\n")
        conf = self.prefix / "conf" / "nginx.conf"
        conf.write_text(self.conf(cert))
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix /
                                                                       "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        if self.tls_port and cert is not None:
            wait_port(self.tls_port, proc=self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        stop(self.proc)


@contextlib.contextmanager
def nginx(prefix: Path, root: Path, *, tls: bool = False) -> Iterator[Nginx]:
    cert = None
    tls_port = None
    if tls:
        _ca, crt, key = make_ca(prefix / "ca")
        cert = (crt, key)
        tls_port = free_port()
    srv = Nginx(prefix, root, free_port(), tls_port)
    srv.start(cert)
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def delay_proxy(upstream_port: int, rtt_ms: float, rate_mbit: float = 0.0) -> Iterator[int]:
    """``bench/netproxy.py`` in front of 127.0.0.1:``upstream_port``; yields its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.netproxy", "--upstream", f"127.0.0.1:{upstream_port}",
         "--rtt-ms", str(rtt_ms), "--rate-mbit", str(rate_mbit)],
        cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        wait_port(port, proc=proc)  # type: ignore[arg-type]
        yield port
    finally:
        stop(proc)  # type: ignore[arg-type]


def moto_missing() -> str | None:
    if shutil.which("moto_server", path=str(Path(sys.executable).parent)) is None:
        return "moto's server is not installed (pip install 'moto[server]', the test extra)"
    return None


@dataclass
class Moto:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def moto(log: Path, *, no_auth_actions: int | None = None) -> Iterator[Moto]:
    """moto's standalone server on 127.0.0.1. With ``no_auth_actions``, requests after that
    many are authenticated (IAM users and SigV4 signatures checked)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    if no_auth_actions is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(no_auth_actions)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
             str(port)], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_port(port, 30, proc=proc)  # type: ignore[arg-type]
        yield Moto(port, proc)  # type: ignore[arg-type]
    finally:
        stop(proc)  # type: ignore[arg-type]
