"""A small in-process Hugging Face Hub server for tests (standard library only).

It speaks the subset of the Hub HTTP API that the real `huggingface_hub` client (and through it
`transformers`) uses to create repos and branches, commit files, list trees and download files:

| endpoint | client call |
|---|---|
| `GET /api/whoami-v2` | `HfApi.whoami` |
| `POST /api/repos/create` | `create_repo` |
| `POST /api/validate-yaml` | README.md metadata check in `create_commit`, `ModelCard.validate` |
| `POST /api/{type}s/{id}/preupload/{rev}` | upload mode of each file ("regular" only) |
| `POST /api/{type}s/{id}/commit/{rev}` | `create_commit` (NDJSON: header, base64 files, deletions) |
| `POST\\|DELETE /api/{type}s/{id}/branch/{branch}` | `create_branch` / `delete_branch` |
| `GET /api/{type}s/{id}[/revision/{rev}]` | `repo_info` / `model_info` (sha, siblings, cardData) |
| `GET /api/{type}s/{id}/tree/{rev}[/{path}]` | `list_repo_tree` / `list_repo_files` (`recursive`) |
| `GET /api/{type}s/{id}/refs` | `list_repo_refs` |
| `HEAD\\|GET /[{type}s/]{id}/resolve/{rev}/{path}` | `hf_hub_download`, `snapshot_download`, `from_pretrained` |

Revisions are real: every branch points at its own commit, every commit holds its own file set,
and a commit to one branch never changes another. A file is addressed by a branch name or by a
full commit sha. Large files are never "lfs": preupload always answers "regular", so run the client
with `HF_HUB_DISABLE_XET=1` (tests/conftest.py does) and every file travels base64 in the commit.

Errors carry the headers the client maps to exceptions: `X-Error-Code: RepoNotFound`,
`RevisionNotFound` or `EntryNotFound` (404), and `X-Repo-Commit` on a missing file so the client
can cache its absence. Write endpoints and `whoami` answer 401 without an `Authorization` header.

Fault injection: `server.fail_next_commits(n=1, status=500)` makes the next `n` commit calls fail
with that status before touching any state.

`server.valid_tokens = {...}` restricts the accepted tokens (default: any non-empty token).

Every request is bounded: bodies over `max_body_bytes` are refused (413) and a connection idle for
`request_timeout` seconds is closed. The fixture stops the server at teardown.

Example (with the `hub_server` fixture):

    def test_upload(hub_server, tmp_path):
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub_server.url, token="hf_test")
        api.create_repo("me/demo")
        (tmp_path / "a.txt").write_text("hello")
        api.upload_folder(folder_path=tmp_path, repo_id="me/demo")
        assert hub_server.repos["me/demo"].files("main")["a.txt"] == b"hello"

For a client in a fresh process, pass `hub_server.client_env()` as the subprocess environment: it
sets `HF_ENDPOINT`, `HF_HUB_OFFLINE=0`, `HF_TOKEN`, `HF_HUB_DISABLE_XET=1` and an empty `HF_HOME`.
In the test process itself, use the `hub_client` fixture: huggingface_hub reads `HF_ENDPOINT` and
`HF_HUB_OFFLINE` once at import, so it patches `huggingface_hub.constants` instead.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import http.server
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

TEST_TOKEN = "hf_hub_server_test_token"
TEST_USER = "hf-pmi-tester"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob (what `git hash-object` prints); the Hub's `oid` of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Commit:
    """One commit: its sha, parent sha, title, date and full file set (path -> blob oid)."""

    sha: str
    parent: str | None
    title: str
    date: str
    tree: dict[str, str]


@dataclass
class Repo:
    """State of one repo. `branches` maps a branch name to a commit sha; blobs are shared by oid."""

    repo_id: str
    repo_type: str = "model"
    private: bool = False
    created_at: str = field(default_factory=_now)
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name or a full commit sha points to, or None."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if _SHA_RE.match(revision) and revision in self.commits:
            return self.commits[revision]
        return None

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """All files of a revision as {path: bytes} (raises KeyError for an unknown revision)."""
        commit = self.resolve(revision)
        if commit is None:
            raise KeyError(f"{self.repo_id} has no revision {revision!r}")
        return {path: self.blobs[oid] for path, oid in commit.tree.items()}

    def history(self, revision: str = "main") -> list[Commit]:
        """Commits reachable from a revision, newest first."""
        commit, out = self.resolve(revision), []
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out

    def _commit(self, branch: str, tree: dict[str, str], title: str) -> Commit:
        parent = self.branches.get(branch)
        payload = json.dumps([parent, sorted(tree.items()), title, len(self.commits)]).encode()
        commit = Commit(hashlib.sha1(payload).hexdigest(), parent, title, _now(), tree)
        self.commits[commit.sha] = commit
        self.branches[branch] = commit.sha
        return commit


class HubError(Exception):
    """An HTTP error answer: status, `X-Error-Code`, message and extra headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LocalHub:
    """The server state and the HTTP server around it. Use `start()` / `stop()` or the fixture."""

    def __init__(self, max_body_bytes: int = 64 * 1024 * 1024, request_timeout: float = 30.0):
        self.repos: dict[str, Repo] = {}
        self.valid_tokens: set[str] | None = None  # None: any non-empty bearer token is accepted
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self._lock = threading.RLock()
        self._fail_commits: list[int] = []
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> "LocalHub":
        hub = self

        class Handler(_Handler):
            server_hub = hub
            timeout = hub.request_timeout

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- test hooks
    def fail_next_commits(self, n: int = 1, status: int = 500) -> None:
        """Make the next `n` commit calls answer `status` without changing any state."""
        with self._lock:
            self._fail_commits.extend([status] * n)

    def client_env(self, home: str | None = None, token: str | None = TEST_TOKEN) -> dict[str, str]:
        """Environment for a client in a fresh process: this endpoint, online, no Xet, empty cache."""
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        home = home or tempfile.mkdtemp(prefix="hf_home_")
        env.update(
            HF_ENDPOINT=self.url,
            HF_HUB_OFFLINE="0",
            TRANSFORMERS_OFFLINE="0",
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HOME=home,
            HF_HUB_CACHE=os.path.join(home, "hub"),
            HF_TOKEN_PATH=os.path.join(home, "token"),
        )
        env.pop("HF_HUB_CACHE_DIR", None)
        if token:
            env["HF_TOKEN"] = token
        return env

    def create_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """Create a repo directly (no HTTP), with the initial `.gitattributes` commit the Hub makes."""
        key = self._key(repo_type, repo_id)
        with self._lock:
            if key in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(repo_id=repo_id, repo_type=repo_type)
            oid = git_blob_sha(GITATTRIBUTES)
            repo.blobs[oid] = GITATTRIBUTES
            repo._commit("main", {".gitattributes": oid}, "initial commit")
            self.repos[key] = repo
            return repo

    # ----------------------------------------------------------------------------- helpers
    @staticmethod
    def _key(repo_type: str, repo_id: str) -> str:
        return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get(self._key(repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.url}/{prefix}{repo.repo_id}"


def _card_data(readme: bytes | None) -> dict | None:
    """The YAML front matter of a README as a dict (None if absent or invalid)."""
    if not readme:
        return None
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.decode("utf-8", "replace"), re.S)
    if not match:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to `LocalHub` state. One instance per connection (HTTP/1.1 keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_hub: LocalHub

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # ----------------------------------------------------------------------------- plumbing
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        hub = self.server_hub
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > hub.max_body_bytes:
                    raise HubError(413, "Request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > hub.max_body_bytes:
            raise HubError(413, "Request body too large")
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict:
        body = self._read_body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid JSON body: {e}")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.server_hub.requests.append((self.command, self.path, status))

    def _send_json(self, data, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(data).encode(), headers)

    def _require_auth(self):
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        valid = self.server_hub.valid_tokens
        if not token or (valid is not None and token not in valid):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str):
        hub = self.server_hub
        self._body_read = False
        try:
            split = urlsplit(self.path)
            segments = [unquote(s) for s in split.path.split("/")[1:]]
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            if segments[:1] == ["api"]:
                self._route_api(method, segments[1:], query)
            else:
                self._route_resolve(method, segments)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.status == 413:
                headers["Connection"] = "close"  # the unread body would corrupt the next request
            elif method in ("POST", "DELETE"):
                try:  # drain an unread body so a keep-alive connection stays usable
                    if not getattr(self, "_body_read", False):
                        self._read_body()
                except Exception:
                    pass
            self._send_json({"error": e.message}, e.status, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug in the server: answer 500 with the reason instead of hanging
            self._send_json({"error": f"hub_server internal error: {type(e).__name__}: {e}"}, 500)
        if hub._httpd is None:
            self.close_connection = True

    # ----------------------------------------------------------------------------- API routes
    def _split_repo(self, rest: list[str]) -> tuple[str, list[str]]:
        if len(rest) < 2:
            raise HubError(400, "Repo ids must look like 'namespace/name'")
        return f"{rest[0]}/{rest[1]}", rest[2:]

    def _route_api(self, method: str, seg: list[str], query: dict):
        hub = self.server_hub
        if seg == ["whoami-v2"] and method == "GET":
            self._require_auth()
            return self._send_json(
                {
                    "type": "user",
                    "name": TEST_USER,
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
                }
            )
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if not seg or seg[0] not in _REPO_TYPES:
            raise HubError(404, f"Unknown endpoint /api/{'/'.join(seg)}")
        repo_type = _REPO_TYPES[seg[0]]
        repo_id, rest = self._split_repo(seg[1:])
        with hub._lock:
            repo = hub._repo(repo_type, repo_id)
        action = rest[0] if rest else None

        if method == "GET" and action in (None, "revision"):
            revision = rest[1] if action == "revision" and len(rest) > 1 else "main"
            return self._repo_info(repo, revision, query)
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self._tree(repo, rest[1], "/".join(rest[2:]), query)
        if method == "GET" and action == "refs":
            return self._refs(repo)
        if method == "POST" and action == "preupload" and len(rest) == 2:
            self._require_auth()
            return self._preupload(repo, rest[1])
        if method == "POST" and action == "commit" and len(rest) == 2:
            self._require_auth()
            return self._commit(repo, rest[1])
        if action == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
            self._require_auth()
            return self._branch(repo, rest[1], method)
        raise HubError(404, f"Unknown endpoint {method} /api/{'/'.join(seg)}")

    def _create_repo(self):
        self._require_auth()
        body = self._json_body()
        self._body_read = True
        name, organization = body.get("name"), body.get("organization")
        if not name or not organization:
            raise HubError(400, "hub_server needs repo ids of the form 'namespace/name'")
        repo_type = body.get("type") or "model"
        repo_id = f"{organization}/{name}"
        hub = self.server_hub
        try:
            repo = hub.create_repo(repo_id, repo_type)
        except HubError as e:
            body = {"error": e.message, "url": hub._repo_url(hub._repo(repo_type, repo_id))}
            return self._send_json(body, e.status, {"X-Error-Message": e.message})
        repo.private = body.get("visibility") == "private" or bool(body.get("private"))
        return self._send_json({"url": hub._repo_url(repo), "name": repo_id, "id": repo_id})

    def _validate_yaml(self):
        import yaml

        body = self._json_body()
        self._body_read = True
        content = body.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if not match:
            return self._send_json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            return self._send_json({"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []}, 400)
        errors = []
        if not isinstance(data, dict):
            errors.append({"message": "YAML metadata must be a mapping"})
        else:
            for key in ("tags", "datasets", "metrics", "language"):
                if key in data and not isinstance(data[key], (str, list)):
                    errors.append({"message": f'"{key}" must be a string or a list of strings'})
            for key in ("pipeline_tag", "library_name", "license"):
                if key in data and not isinstance(data[key], str):
                    errors.append({"message": f'"{key}" must be a string'})
        return self._send_json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _repo_info(self, repo: Repo, revision: str, query: dict):
        with self.server_hub._lock:
            commit = self.server_hub._commit_of(repo, revision)
            blobs = query.get("blobs", "").lower() in ("1", "true")
            siblings = []
            for path, oid in sorted(commit.tree.items()):
                sibling = {"rfilename": path}
                if blobs:
                    sibling.update(size=len(repo.blobs[oid]), blobId=oid)
                siblings.append(sibling)
            card = _card_data(repo.blobs.get(commit.tree.get("README.md", "")))
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card or {}).get("tags") or []),
            "siblings": siblings,
        }
        if card is not None:
            info["cardData"] = card
            for key in ("library_name", "pipeline_tag"):
                if isinstance(card.get(key), str):
                    info[key] = card[key]
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return self._send_json(info)

    def _tree(self, repo: Repo, revision: str, path: str, query: dict):
        recursive = query.get("recursive", "").lower() in ("1", "true")
        path = path.strip("/")
        with self.server_hub._lock:
            commit = self.server_hub._commit_of(repo, revision)
            tree = dict(commit.tree)
        prefix = f"{path}/" if path else ""
        if path and path in tree:
            raise HubError(400, f"{path} is a file, not a folder")
        under = {p: oid for p, oid in tree.items() if p.startswith(prefix)}
        if path and not under:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        files, folders = [], set()
        for p, oid in under.items():
            parts = p[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.append({"type": "file", "oid": oid, "size": len(repo.blobs[oid]), "path": p})
        if not recursive:
            folders = {f for f in folders if "/" not in f[len(prefix) :]}
        entries = [
            {"type": "directory", "oid": hashlib.sha1(f"{commit.sha}:{f}".encode()).hexdigest(), "path": f}
            for f in sorted(folders)
        ] + sorted(files, key=lambda e: e["path"])
        return self._send_json(entries)

    def _refs(self, repo: Repo):
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha} for name, sha in sorted(repo.branches.items())
        ]
        return self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _preupload(self, repo: Repo, revision: str):
        body = self._json_body()
        self._body_read = True
        with self.server_hub._lock:
            commit = self.server_hub._commit_of(repo, revision)
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": commit.tree.get(f["path"])}
                for f in body.get("files", [])
            ]
        return self._send_json({"files": files, "commitOid": commit.sha})

    def _commit(self, repo: Repo, revision: str):
        hub = self.server_hub
        body = self._read_body()
        self._body_read = True
        with hub._lock:
            if hub._fail_commits:
                status = hub._fail_commits.pop(0)
                raise HubError(status, "Injected commit failure (hub_server.fail_next_commits)")
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            tree, blobs, title = dict(head.tree), {}, "Upload"
            for line in body.splitlines():
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise HubError(400, f"Invalid NDJSON line in commit payload: {e}")
                key, value = item.get("key"), item.get("value", {})
                if key == "header":
                    title = value.get("summary") or title
                    parent = value.get("parentCommit")
                    if parent is not None and parent != head.sha:
                        raise HubError(412, f"Parent commit {parent} is not the head of {revision}")
                elif key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, "Only base64 file content is supported")
                    data = base64.b64decode(value["content"])
                    oid = git_blob_sha(data)
                    blobs[oid] = data
                    tree[value["path"]] = oid
                elif key == "deletedFile":
                    if value["path"] not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                    del tree[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {value['path']}", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
                elif key == "lfsFile":
                    raise HubError(400, "hub_server stores regular files only; set HF_HUB_DISABLE_XET=1")
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            repo.blobs.update(blobs)
            commit = repo._commit(revision, tree, title)
        url = f"{hub._repo_url(repo)}/commit/{commit.sha}"
        return self._send_json({"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None})

    def _branch(self, repo: Repo, branch: str, method: str):
        hub = self.server_hub
        body = self._json_body()
        self._body_read = True
        with hub._lock:
            if method == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return self._send_json({})
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            start = hub._commit_of(repo, body.get("startingPoint") or "main")
            repo.branches[branch] = start.sha
        return self._send_json({})

    # ----------------------------------------------------------------------------- downloads
    def _route_resolve(self, method: str, seg: list[str]):
        hub = self.server_hub
        if method not in ("GET", "HEAD"):
            raise HubError(405, "Method not allowed")
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = _REPO_TYPES[seg[0]], seg[1:]
        if len(seg) < 5 or seg[2] != "resolve":
            raise HubError(404, f"Unknown path {self.path}")
        repo_id, revision, path = f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:])
        with hub._lock:
            repo = hub._repo(repo_type, repo_id)
            commit = hub._commit_of(repo, revision)
            oid = commit.tree.get(path)
            data = repo.blobs.get(oid) if oid else None
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {"ETag": f'"{oid}"', "X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        status, body = 200, data
        match = re.match(r"bytes=(\d*)-(\d*)$", self.headers.get("Range", ""))
        if match and method == "GET" and (match.group(1) or match.group(2)):
            start = int(match.group(1)) if match.group(1) else len(data) - int(match.group(2))
            end = int(match.group(2)) if match.group(1) and match.group(2) else len(data) - 1
            if start >= len(data):
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            body, status = data[start : end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        self._send(status, body, headers, content_type="application/octet-stream")


@pytest.fixture
def hub_server():
    """A running `LocalHub` on 127.0.0.1 (random port), stopped at teardown.

    Attributes: `.url`, `.repos` ({repo_id: Repo}), `.requests`, `.fail_next_commits(n, status)`,
    `.client_env()` (environment for a client subprocess).
    """
    server = LocalHub().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_client(hub_server, monkeypatch, tmp_path):
    """Point this process's `huggingface_hub` at `hub_server`, online, with a token and an empty cache.

    huggingface_hub reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` once at import (into
    `huggingface_hub.constants.ENDPOINT`, `HUGGINGFACE_CO_URL_TEMPLATE`, `HF_HUB_OFFLINE`), and the
    cache folder likewise, so setting the environment here is not enough: the constants are patched
    too (and restored by monkeypatch). Yields the server.
    """
    from huggingface_hub import constants

    cache = str(tmp_path / "hf_cache")
    for name, value in {
        "ENDPOINT": hub_server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub_server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_CACHE": cache,
        "HF_TOKEN_PATH": str(tmp_path / "no_token_file"),
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield hub_server
