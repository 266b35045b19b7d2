"""A Hugging Face Hub on 127.0.0.1 for tests: model and dataset repositories served from a local folder.

    with FakeHub(root) as hub:      # root/models/<org>/<name>/..., root/datasets/<org>/<name>/...
        env = {**os.environ, **hub.env}   # HF_ENDPOINT=http://127.0.0.1:<port>, empty caches
        subprocess.run([...], env=env)

huggingface_hub and datasets read HF_ENDPOINT when they are imported, so the code under test runs in a child
process and talks to this server exactly as it would to huggingface.co: repository info, file trees,
paths-info and file downloads (HEAD, GET, byte ranges). Every repository is at one commit (`COMMIT`), and
every branch or tag name resolves to it. Served: what huggingface_hub's snapshot_download /
list_repo_files / HfFileSystem and datasets' streaming `load_dataset` ask for; anything else is a 404.
`requests` records the (method, path) of every request.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import threading
import urllib.parse

COMMIT = "d" * 40
_KINDS = {"models": "", "datasets": "datasets/"}  # Repository type -> its URL prefix for file downloads.


class FakeHub:

  def __init__(self, root: str, cache_dir: str):
    self.root, self.cache_dir = str(root), str(cache_dir)
    self.requests: list[tuple[str, str]] = []
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def do_GET(self):
        hub.requests.append((self.command, self.path))
        hub._handle(self)

      do_HEAD = do_GET

      def do_POST(self):
        hub.requests.append((self.command, self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        hub._handle(self, body)

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self.env = {"HF_ENDPOINT": self.url, "HF_HUB_CACHE": os.path.join(self.cache_dir, "hub"),
                "HF_DATASETS_CACHE": os.path.join(self.cache_dir, "datasets"), "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": ""}

  def __enter__(self):
    threading.Thread(target=self._server.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()

  # Repository contents ------------------------------------------------------------------------------
  def _repo_dir(self, kind: str, repo: str) -> str:
    return os.path.join(self.root, kind, repo)

  def _files(self, kind: str, repo: str) -> list[str]:
    base = self._repo_dir(kind, repo)
    return sorted(os.path.relpath(os.path.join(d, f), base) for d, _, files in os.walk(base) for f in files)

  def _entry(self, kind: str, repo: str, path: str) -> dict:
    full = os.path.join(self._repo_dir(kind, repo), path)
    if os.path.isdir(full):
      return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
    with open(full, "rb") as f:
      data = f.read()
    return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

  def _tree(self, kind: str, repo: str, sub: str, recursive: bool) -> list[dict] | None:
    sub = sub.strip("/")
    if not os.path.isdir(os.path.join(self._repo_dir(kind, repo), sub)):
      return None
    paths: list[str] = []
    for file in self._files(kind, repo):
      if sub and not file.startswith(sub + "/"):
        continue
      parts = file[len(sub) + 1 if sub else 0:].split("/")
      depth = len(parts) if recursive else 1
      for k in range(1, depth + 1):
        path = "/".join(([sub] if sub else []) + parts[:k])
        if path not in paths:
          paths.append(path)
    return [self._entry(kind, repo, p) for p in paths]

  # HTTP -----------------------------------------------------------------------------------------------
  def _handle(self, handler, body: str = ""):
    url = urllib.parse.urlparse(handler.path)
    path, query = urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)
    if path == "/api/agent-harnesses":
      return _send(handler, 200, {})
    match = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)(/.*)?$", path)
    if match:
      kind, repo, rest = match.group(1), match.group(2), match.group(3) or ""
      if not os.path.isdir(self._repo_dir(kind, repo)):
        return _missing(handler, "RepoNotFound")
      if rest == "" or re.match(r"^/revision/[^/]+$", rest):
        return _send(handler, 200, {"id": repo, "sha": COMMIT, "private": False, "disabled": False, "gated": False,
                                    "siblings": [{"rfilename": f} for f in self._files(kind, repo)],
                                    "cardData": {}, "tags": [], "lastModified": "2026-01-01T00:00:00.000Z"})
      tree = re.match(r"^/tree/[^/]+/?(.*)$", rest)
      if tree:
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        entries = self._tree(kind, repo, tree.group(1), recursive)
        return _missing(handler) if entries is None else _send(handler, 200, entries)
      if re.match(r"^/paths-info/[^/]+$", rest) and handler.command == "POST":
        if "json" in (handler.headers.get("Content-Type") or ""):
          paths = json.loads(body or "{}").get("paths", [])
        else:
          paths = urllib.parse.parse_qs(body).get("paths", [])
        existing = [p for p in paths if os.path.exists(os.path.join(self._repo_dir(kind, repo), p))]
        return _send(handler, 200, [self._entry(kind, repo, p) for p in existing])
      return _missing(handler)
    match = re.match(r"^/(datasets/)?([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)
    if match:
      kind = "datasets" if match.group(1) else "models"
      full = os.path.join(self._repo_dir(kind, match.group(2)), match.group(3))
      if not os.path.isdir(self._repo_dir(kind, match.group(2))):
        return _missing(handler, "RepoNotFound")
      if not os.path.isfile(full):
        return _missing(handler)
      with open(full, "rb") as f:
        data = f.read()
      headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Accept-Ranges": "bytes"}
      byte_range = handler.headers.get("Range")
      if byte_range and handler.command == "GET":
        start, end = re.match(r"bytes=(\d+)-(\d*)", byte_range).groups()
        start, end = int(start), int(end) if end else len(data) - 1
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _send(handler, 206, data[start:end + 1], headers, "application/octet-stream")
      return _send(handler, 200, data, headers, "application/octet-stream")
    return _missing(handler)


def _send(handler, code: int, body, headers: dict | None = None, content_type: str = "application/json"):
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  handler.send_response(code)
  handler.send_header("Content-Type", content_type)
  for key, value in (headers or {}).items():
    handler.send_header(key, value)
  handler.send_header("Content-Length", str(len(data)))
  handler.end_headers()
  if handler.command != "HEAD":
    handler.wfile.write(data)


def _missing(handler, code: str = "EntryNotFound"):
  _send(handler, 404, {"error": code}, {"X-Error-Code": code, "X-Error-Message": code})
