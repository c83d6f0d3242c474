"""Debian's nginx in front of test gateways, running deploy/'s own files.

`deploy/nginx/stox.conf` is rendered into a folder with the test's ports and log path (each
replaced line must be found exactly once, so a change to the file's shape fails loudly), and
included from a small main configuration of the test's own: its pid file, error log and temp
folders in that folder, one worker, no daemon. `deploy/stox.env` gives the gateways their
environment, its addresses replaced by the test's.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest
from procs import REPO, Proc

NGINX = Path("/usr/sbin/nginx")
DEPLOY = REPO / "deploy"
SITE = DEPLOY / "nginx" / "stox.conf"
ENV_FILE = DEPLOY / "stox.env"
UPSTREAMS = ("server 127.0.0.1:8081 ", "server 127.0.0.1:8082 ")  # as in SITE


def require_nginx() -> None:
    """Skip without nginx; with CI=true, fail instead (`.ci/run` installs it)."""
    if NGINX.is_file() and os.access(NGINX, os.X_OK):
        return
    message = f"{NGINX} is missing: `apt-get install nginx`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{SITE.name} should hold {old!r} once"
    return text.replace(old, new)


# which instances each request went to, and what they answered (`-` for none)
LOG_FORMAT = (
    "  log_format upstreams '$remote_addr $request $status $request_time "
    "$upstream_addr $upstream_status $upstream_response_time';"
)


def render_site(listen: int, upstreams: tuple[int, int], folder: Path) -> str:
    """deploy/nginx/stox.conf listening on 127.0.0.1:`listen`, in front of `upstreams`."""
    site = _replace_once(SITE.read_text(), "listen 80;", f"listen 127.0.0.1:{listen};")
    for line, port in zip(UPSTREAMS, upstreams, strict=True):
        site = _replace_once(site, line, f"server 127.0.0.1:{port} ")
    access_log = "access_log /var/log/nginx/stox.access.log;"
    return _replace_once(site, access_log, f"access_log {folder / 'access.log'} upstreams;")


def main_conf(folder: Path, site: Path) -> str:
    """The main context, everything in `folder`. A root master would hand its workers to
    `nobody`, who cannot enter a pytest folder: they run as the test's own user instead
    (the directive is ignored, with a notice, when the master is not root)."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    temp = "\n".join(
        f"  {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"user {user};\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n{temp}\n{LOG_FORMAT}\n  include {site};\n}}\n"
    )


def start(folder: Path, listen: int, upstreams: tuple[int, int]) -> Proc:
    """nginx (checked with `nginx -t` first) in the foreground, with `folder` as its prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    site, conf = folder / "stox.conf", folder / "nginx.conf"
    site.write_text(render_site(listen, upstreams, folder))
    conf.write_text(main_conf(folder, site))
    command = [str(NGINX), "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf)]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    log_path = folder / "nginx.out"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [*command, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Proc("nginx", popen, log_path)


def error_log(folder: Path) -> str:
    return (folder / "error.log").read_text(errors="replace")


def stox_env(**replace: str) -> dict[str, str]:
    """deploy/stox.env as a mapping, with the values of `replace` (each must be in it)."""
    env: dict[str, str] = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    missing = set(replace) - set(env)
    assert not missing, f"{ENV_FILE.name} lacks {sorted(missing)}"
    return env | replace
