#!/usr/bin/env python3
"""A local stand-in for Fly.io's Machines API app secrets endpoints.

Fly's API cannot run here, so the SecretBundle tests talk to this instead. It implements the
documented requests and answers only (Fly's "Working with the Machines API" page and the
Machines API reference's app secrets operations):

  GET    /v1/apps/{app}/secrets          200 {"secrets": [{"name", "digest", "created_at",
                                              "updated_at"}]}
  POST   /v1/apps/{app}/secrets          body {"values": {"NAME": "value" | null}} (null
                                          unsets); 200 {"secrets": [...], "version": n}
  DELETE /v1/apps/{app}/secrets/{name}   200 {"version": n}

Every request needs `Authorization: Bearer <token>` with a token this stand-in was given
(401 otherwise). An unknown app is 404, a body that is not the documented JSON is 400, an
unknown path 404, a wrong method 405; every error body is {"error": "..."}. The digest is this
stand-in's own keyed hash: like Fly's, it is not documented, so a client cannot compute it.

Control (for the tests, under /_standin/, no token):
  POST /_standin/apps      {"name": "app"}           an app exists
  POST /_standin/tokens    {"token": "..."}          a token is accepted
  POST /_standin/faults    {"app", "status", "times", "retry_after"}: the app's next `times`
                           requests answer `status` (429 with Retry-After when given)
  GET  /_standin/values/{app}   the app's values (what Fly's Machines would read)
  GET  /_standin/log       every request: method, path, status, whether the token was right
                           (never a body or a header value)

Prints "LISTENING <port>" on stdout once ready; exits when stdin closes.
"""

import argparse
import hashlib
import hmac
import json
import os
import re
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
APP_PATH = re.compile(r"^/v1/apps/([^/]+)/secrets(?:/([^/]+))?$")

LOCK = threading.RLock()
APPS = {}  # app -> {"secrets": {name: {"value", "digest", "created_at", "updated_at"}}, "version": n}
TOKENS = set()
FAULTS = {}  # app -> [status, times, retry_after]
LOG = []
DIGEST_KEY = os.urandom(16)


def now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def digest(app, value):
    return hmac.new(DIGEST_KEY, (app + "\0" + value).encode(), hashlib.sha256).hexdigest()[:32]


def listing(app):
    out = []
    for name in sorted(APPS[app]["secrets"]):
        s = APPS[app]["secrets"][name]
        out.append(
            {
                "name": name,
                "digest": s["digest"],
                "created_at": s["created_at"],
                "updated_at": s["updated_at"],
            }
        )
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: the log below is what tests read
        pass

    def log_error(self, fmt, *args):
        sys.stderr.write("fly-api stand-in: " + (fmt % args) + "\n")

    def answer(self, status, body, headers=None, token_ok=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        if not self.path.startswith("/_standin/"):
            with LOCK:
                LOG.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "status": status,
                        "token_ok": token_ok,
                    }
                )

    def error(self, status, message, headers=None, token_ok=None):
        self.answer(status, {"error": message}, headers, token_ok)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return ValueError("not JSON")

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_DELETE(self):
        self.route("DELETE")

    def do_PUT(self):
        self.route("PUT")

    def route(self, method):
        body = self.body() if method in ("POST", "PUT") else None
        if self.path.startswith("/_standin/"):
            return self.control(method, body)
        path = self.path.split("?", 1)[0]
        m = APP_PATH.match(path)
        if not m:
            return self.error(404, "not found")
        app, name = m.group(1), m.group(2)
        auth = self.headers.get("Authorization") or ""
        token_ok = auth.startswith("Bearer ") and auth[len("Bearer "):] in TOKENS
        if not token_ok:
            return self.error(401, "unauthorized", token_ok=False)
        with LOCK:
            fault = FAULTS.get(app)
            if fault and fault[1] > 0:
                fault[1] -= 1
                status, _, retry_after = fault
                headers = {"Retry-After": str(retry_after)} if status == 429 and retry_after is not None else None
                message = {
                    429: "rate limit exceeded",
                    422: "validation failed",
                    408: "request timed out",
                }.get(status, "internal server error")
                return self.error(status, message, headers, token_ok=True)
            if app not in APPS:
                return self.error(404, "app not found", token_ok=True)
            state = APPS[app]
            if name is None and method == "GET":
                return self.answer(200, {"secrets": listing(app)}, token_ok=True)
            if name is None and method == "POST":
                if not isinstance(body, dict) or not isinstance(body.get("values"), dict):
                    return self.error(400, "request body must be {\"values\": {...}}", token_ok=True)
                values = body["values"]
                for k, v in values.items():
                    if not NAME.match(k):
                        return self.error(400, "invalid secret name " + json.dumps(k), token_ok=True)
                    if v is not None and not isinstance(v, str):
                        return self.error(400, "the value of " + k + " must be a string or null", token_ok=True)
                t = now()
                for k, v in values.items():
                    if v is None:
                        state["secrets"].pop(k, None)
                    else:
                        old = state["secrets"].get(k)
                        state["secrets"][k] = {
                            "value": v,
                            "digest": digest(app, v),
                            "created_at": old["created_at"] if old else t,
                            "updated_at": t,
                        }
                state["version"] += 1
                v = state["version"]
                return self.answer(200, {"secrets": listing(app), "version": v, "Version": v}, token_ok=True)
            if name is not None and method == "DELETE":
                if name not in state["secrets"]:
                    return self.error(404, "secret not found", token_ok=True)
                del state["secrets"][name]
                state["version"] += 1
                v = state["version"]
                return self.answer(200, {"version": v, "Version": v}, token_ok=True)
            return self.error(405, "method not allowed", token_ok=True)

    def control(self, method, body):
        path = self.path
        with LOCK:
            if method == "POST" and path == "/_standin/apps":
                APPS.setdefault(body["name"], {"secrets": {}, "version": 0})
                return self.answer(200, {})
            if method == "POST" and path == "/_standin/tokens":
                TOKENS.add(body["token"])
                return self.answer(200, {})
            if method == "POST" and path == "/_standin/faults":
                FAULTS[body["app"]] = [int(body["status"]), int(body["times"]), body.get("retry_after")]
                return self.answer(200, {})
            if method == "GET" and path.startswith("/_standin/values/"):
                app = path[len("/_standin/values/"):]
                if app not in APPS:
                    return self.error(404, "app not found")
                return self.answer(200, {k: s["value"] for k, s in APPS[app]["secrets"].items()})
            if method == "GET" and path == "/_standin/log":
                return self.answer(200, list(LOG))
        return self.error(404, "not found")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("LISTENING %d" % server.server_address[1], flush=True)
    sys.stdin.read()  # returns at EOF: the test process is gone
    server.shutdown()


if __name__ == "__main__":
    main()
