"""A small fake Hugging Face Hub on 127.0.0.1, so that the real huggingface_hub client code (create_repo,
preupload, commit) runs in tests without a network.

Set `HF_ENDPOINT=http://127.0.0.1:PORT` before huggingface_hub is imported. Every commit writes its files under
`<store>/<namespace>/<repo>/` and is appended to `<store>/commits.jsonl`. Downloads are not served: tests reload
the uploaded copy from the store folder. Uploads are always "regular" (inline base64), never LFS or Xet.

    python tests/fake_hub.py --store /tmp/store --port 0   # prints the port, serves until killed
"""

import argparse
import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHubHandler(BaseHTTPRequestHandler):
    store = "."

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status, payload=None, headers=None):
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _log(self, entry):
        with open(os.path.join(self.store, "requests.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def do_HEAD(self):
        self._log({"method": "HEAD", "path": self.path})
        self._reply(404, headers={"X-Error-Code": "EntryNotFound"})

    def do_GET(self):
        self._log({"method": "GET", "path": self.path})
        if self.path.startswith("/api/whoami"):
            return self._reply(200, {"name": "me", "type": "user", "orgs": [], "auth": {"type": "access_token"}})
        self._reply(404, {"error": "not served by the fake hub"}, headers={"X-Error-Code": "EntryNotFound"})

    def do_POST(self):
        body = self._body()
        path = self.path.split("?")[0]
        self._log({"method": "POST", "path": path})
        if path == "/api/repos/create":
            request = json.loads(body or b"{}")
            name = request.get("name")
            repo_id = f"{request['organization']}/{name}" if request.get("organization") else name
            if "/" not in repo_id:
                repo_id = f"me/{repo_id}"
            os.makedirs(os.path.join(self.store, repo_id), exist_ok=True)
            host = f"http://{self.headers.get('Host')}"
            return self._reply(200, {"url": f"{host}/{repo_id}", "name": repo_id, "id": repo_id})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body or b"{}").get("files", [])
            return self._reply(
                200,
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if "/commit/" in path:
            repo_id = path[len("/api/models/"):].split("/commit/")[0]
            written = []
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item.get("key") == "file":
                    value = item["value"]
                    target = os.path.join(self.store, repo_id, value["path"])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as f:
                        f.write(base64.b64decode(value["content"]))
                    written.append(value["path"])
                elif item.get("key") == "deletedFile":
                    target = os.path.join(self.store, repo_id, item["value"]["path"])
                    if os.path.exists(target):
                        os.remove(target)
            with open(os.path.join(self.store, "commits.jsonl"), "a") as f:
                f.write(json.dumps({"repo": repo_id, "files": sorted(written)}) + "\n")
            host = f"http://{self.headers.get('Host')}"
            oid = "%040x" % (abs(hash((repo_id, tuple(written)))) % (1 << 160))
            return self._reply(200, {"commitUrl": f"{host}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True})
        self._reply(404, {"error": f"unknown endpoint {path}"})


class FakeHub:
    """Context manager / background server: `with FakeHub(store) as hub: hub.endpoint`."""

    def __init__(self, store: str, port: int = 0):
        os.makedirs(store, exist_ok=True)
        handler = type("Handler", (FakeHubHandler,), {"store": store})
        self.store = store
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def commits(self):
        path = os.path.join(self.store, "commits.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    hub = FakeHub(args.store, args.port)
    print(hub.endpoint, flush=True)
    hub.server.serve_forever()
