"""Run the real nginx/nginx.conf on loopback, for tests.

The config is written for compose (`server gateway:8000`, `listen 6006`). `render_nginx_conf`
points those two lines at local ports and writes the trusted proxies (TRUSTED_PROXIES) in place of
the include that the container fills at start (nginx/trusted-proxies.sh); `run_nginx` starts a
private nginx with the result and stops it afterwards:

    with run_nginx(tmp_path, listen_port=None, gateway_port=8000) as edge:
        urllib.request.urlopen(edge.url + "/healthz")
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = REPO_ROOT / "nginx" / "nginx.conf"
UPSTREAM_LINE = "server gateway:8000"
LISTEN_LINE = "listen 6006"
# Filled at container start by nginx/trusted-proxies.sh; here replaced by the same set_real_ip_from lines.
TRUSTED_PROXIES_INCLUDE = "include /etc/nginx/llamaq/trusted-proxies.conf;"
# Temp paths nginx needs when it cannot use its compiled-in ones (those need root).
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def find_nginx() -> str | None:
    """The nginx binary, also when /usr/sbin is not on PATH."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trusted_proxy_lines(trusted_proxies: str) -> list[str]:
    """TRUSTED_PROXIES (addresses or CIDRs, comma or space separated) as nginx directives, one per entry: what
    nginx/trusted-proxies.sh writes in the container. Raises ValueError on an entry it would refuse too."""
    lines = []
    for entry in trusted_proxies.replace(",", " ").split():
        if not re.fullmatch(r"[0-9A-Fa-f.:/]+", entry):
            raise ValueError(f"TRUSTED_PROXIES: {entry!r} is not an IP address or CIDR")
        lines.append(f"set_real_ip_from {entry};")
    return lines


def render_nginx_conf(
    src_text: str,
    listen_port: int,
    gateway_port: int,
    *,
    gateway_host: str = "127.0.0.1",
    temp_dir: Path | None = None,
    trusted_proxies: str = "",
) -> str:
    """The compose config with nginx listening on 127.0.0.1:listen_port and the upstream at
    gateway_host:gateway_port. With temp_dir, nginx's temp files go there (needed when not root).
    trusted_proxies: as the TRUSTED_PROXIES setting (empty: trust nobody)."""
    for needle in (UPSTREAM_LINE, LISTEN_LINE, TRUSTED_PROXIES_INCLUDE):
        count = src_text.count(needle)
        if count != 1:
            raise ValueError(f"nginx.conf must contain {needle!r} exactly once, found {count}")
    text = src_text.replace(UPSTREAM_LINE, f"server {gateway_host}:{gateway_port}")
    text = text.replace(LISTEN_LINE, f"listen 127.0.0.1:{listen_port}")
    lines = trusted_proxy_lines(trusted_proxies) or ["# TRUSTED_PROXIES empty: trust nobody."]
    text = text.replace(TRUSTED_PROXIES_INCLUDE, "\n    ".join(lines))
    if temp_dir is not None:
        if text.count("http {") != 1:
            raise ValueError("nginx.conf must contain 'http {' exactly once")
        directives = "".join(
            f"\n    {name}_temp_path {Path(temp_dir) / name};" for name in _TEMP_PATHS
        )
        text = text.replace("http {", "http {" + directives, 1)
    return text


def _temp_dir_if_unprivileged(workdir: Path) -> Path | None:
    # As root nginx uses its compiled-in temp paths (workers run as nobody and could not
    # enter a private tmp dir); otherwise those paths are not writable, so use workdir.
    if os.geteuid() == 0:
        return None
    temp = workdir / "temp"
    temp.mkdir(parents=True, exist_ok=True)  # nginx creates only the last path level
    return temp


def nginx_test(conf_text: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on conf_text (already rendered), written to workdir/nginx.conf."""
    nginx = find_nginx()
    if nginx is None:
        raise FileNotFoundError("nginx not found: run `make tools`")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(conf_text)
    return subprocess.run(
        [nginx, "-t", "-e", "stderr", "-p", f"{workdir}/", "-c", str(conf), "-g", f"pid {workdir / 'nginx.pid'};"],
        capture_output=True,
        text=True,
        timeout=30,
    )


@dataclass
class NginxInstance:
    port: int
    url: str
    workdir: Path
    process: subprocess.Popen[bytes]
    access_log: Path
    error_log: Path

    def read_error_log(self) -> str:
        return self.error_log.read_text(errors="replace")

    def read_access_log(self) -> str:
        """JSON lines, one a request (log_format llamaq_json)."""
        return self.access_log.read_text(errors="replace")


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        # The master died already (kill -9): its workers would run on, still serving the port. Own session: the
        # group is this master's workers only.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
    # TERM is nginx's fast shutdown (QUIT would wait for open event streams).
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Own session: the group is this master and its workers only.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


@contextmanager
def run_nginx(
    workdir: Path,
    listen_port: int | None,
    gateway_port: int,
    *,
    gateway_host: str = "127.0.0.1",
    conf_text: str | None = None,
    trusted_proxies: str = "",
    startup_timeout: float = 15.0,
    stop_timeout: float = 10.0,
) -> Iterator[NginxInstance]:
    """Run nginx in the foreground with the rendered config until the block ends.

    listen_port: None picks a free one (see the yielded instance's port and url).
    conf_text: an already rendered config to use instead of rendering nginx/nginx.conf.
    trusted_proxies: as the TRUSTED_PROXIES setting, for the rendered config (empty: trust nobody).
    Raises RuntimeError carrying nginx's stderr if it does not come up."""
    nginx = find_nginx()
    if nginx is None:
        raise FileNotFoundError("nginx not found: run `make tools`")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = listen_port if listen_port is not None else free_port()
    if conf_text is None:
        temp_dir = _temp_dir_if_unprivileged(workdir)
        conf_text = render_nginx_conf(
            NGINX_CONF.read_text(), port, gateway_port, gateway_host=gateway_host, temp_dir=temp_dir,
            trusted_proxies=trusted_proxies,
        )
    conf = workdir / "nginx.conf"
    conf.write_text(conf_text)
    pid_file = workdir / "nginx.pid"
    pid_file.unlink(missing_ok=True)
    access_log = workdir / "access.log"  # nginx's stdout (access_log /dev/stdout)
    error_log = workdir / "error.log"  # nginx's stderr (error_log stderr)
    with open(access_log, "wb") as out, open(error_log, "wb") as err:
        process = subprocess.Popen(
            [nginx, "-e", "stderr", "-p", f"{workdir}/", "-c", str(conf), "-g", f"daemon off; pid {pid_file};"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    instance = NginxInstance(port, f"http://127.0.0.1:{port}", workdir, process, access_log, error_log)
    try:
        deadline = time.monotonic() + startup_timeout
        # The pid file appears only after nginx has bound its port: a port that merely accepts
        # could belong to someone else.
        while not (pid_file.exists() and _port_accepts(port)):
            if process.poll() is not None:
                raise RuntimeError(
                    f"nginx exited with {process.returncode} at startup:\n{instance.read_error_log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nginx did not accept on 127.0.0.1:{port} within {startup_timeout}s:\n"
                    f"{instance.read_error_log()}"
                )
            time.sleep(0.05)
        yield instance
    finally:
        _stop(process, stop_timeout)
