#!/usr/bin/env python3
"""An upstream for end-to-end tests: answers every request with 200 and what it received.

    python3 tests/e2e/echo_upstream.py PORT [--name NAME]

Listens on 127.0.0.1:PORT (0 picks a free port) and prints "listening on 127.0.0.1:<port>"
on stdout once it accepts connections, so a test can start it and read the port. Each
response is JSON:

    {"upstream": NAME, "method": "GET", "path": "/v2/code/x?y=1",
     "headers": {"x-gitlab-authz-subject": "...", ...}, "body_bytes": 0}

Header names are lower-cased; a header sent more than once is joined with ", ". The path is
the request target as received, query string included. Stdlib only; stops on SIGTERM/SIGINT.
"""

import argparse
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream connections expect
    upstream_name = "echo"

    def _echo(self):
        body = self._read_body()
        headers = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        payload = json.dumps(
            {
                "upstream": self.upstream_name,
                "method": self.command,
                "path": self.path,
                "headers": headers,
                "body_bytes": len(body),
            },
            sort_keys=True,
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self):
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _echo

    def log_message(self, format, *args):  # quiet: tests read stdout for the port line
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--name", default="echo", help='the "upstream" field of each answer')
    args = parser.parse_args(argv)

    handler = type("Handler", (EchoHandler,), {"upstream_name": args.name})
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.daemon_threads = True

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
