"""A loopback stand-in for the Databricks workspace endpoints that ``mlflow run -b databricks`` calls.

It answers the DBFS and Jobs calls MLflow's submission code makes (get-status, the tarball upload,
runs/submit, runs/get) and records them; ``/api/*/mlflow/*`` is passed through to a real
``mlflow server``, so with ``MLFLOW_TRACKING_URI=databricks`` the run lands in the test server. The
submitted job is not executed: the test checks what would run.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JOB_RUN_ID = 4242
JOB_ID = 77


@dataclass
class Recorded:
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) in order
    unauthorised: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # DBFS path -> content
    submitted: list[dict] = field(default_factory=list)  # runs/submit request bodies


class FakeWorkspace:
    def __init__(self, token: str, tracking_server: str):
        self.token, self.tracking_server = token, tracking_server.rstrip("/")
        self.recorded = Recorded()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        ws = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, body: bytes | dict, content_type="application/json"):
                data = json.dumps(body).encode() if isinstance(body, dict) else body
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                url = urllib.parse.urlsplit(self.path)
                body = self._body()
                ws.recorded.requests.append((self.command, url.path))
                if url.path == "/.well-known/databricks-config":
                    # The SDK's unauthenticated host discovery; a 404 is what a workspace without it says.
                    return self._reply(404, {"error_code": "NOT_FOUND", "message": url.path})
                if self.headers.get("Authorization") != f"Bearer {ws.token}":
                    ws.recorded.unauthorised.append(url.path)
                    return self._reply(401, {"error_code": "UNAUTHENTICATED", "message": "bad token"})
                if "/mlflow/" in url.path:
                    return self._proxy(url, body)
                if url.path == "/api/2.0/dbfs/get-status":
                    path = json.loads(body or b"{}").get("path", "")
                    if path in ws.recorded.files:
                        size = len(ws.recorded.files[path])
                        return self._reply(200, {"path": path, "is_dir": False, "file_size": size})
                    return self._reply(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"No file: {path}"})
                if self.command == "POST" and url.path.startswith("/dbfs/"):
                    ws.recorded.files[url.path[len("/dbfs") :]] = body
                    return self._reply(200, {})
                if url.path == "/api/2.0/jobs/runs/submit":
                    ws.recorded.submitted.append(json.loads(body))
                    return self._reply(200, {"run_id": JOB_RUN_ID})
                if url.path == "/api/2.0/jobs/runs/get":
                    state = {"life_cycle_state": "TERMINATED", "result_state": "SUCCESS"}
                    page = f"{ws.url}/#job/{JOB_ID}/run/{JOB_RUN_ID}"
                    run = {"run_id": JOB_RUN_ID, "job_id": JOB_ID, "run_page_url": page, "state": state}
                    return self._reply(200, run)
                ws.recorded.unexpected.append(f"{self.command} {url.path}")
                return self._reply(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": url.path})

            def _proxy(self, url, body: bytes):
                target = ws.tracking_server + url.path + (f"?{url.query}" if url.query else "")
                req = urllib.request.Request(target, data=body if body else None, method=self.command)
                if self.headers.get("Content-Type"):
                    req.add_header("Content-Type", self.headers["Content-Type"])
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        return self._reply(r.status, r.read(), r.headers.get("Content-Type", "application/json"))
                except urllib.error.HTTPError as e:
                    return self._reply(e.code, e.read(), e.headers.get("Content-Type", "application/json"))

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

        return Handler
