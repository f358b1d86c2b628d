"""Hugging Face Hub plumbing for continual runs: one branch per task, `main` follows the latest task.

A continual run pushes the checkpoint of every finished task to its own branch, `task-{i}`, so any
step of the sequence can be reloaded with `revision="task-{i}"`, and `main` always holds the latest
task. Three functions, all built on `huggingface_hub`:

- `check_hub_access` runs *before* training when `push_to_hub=True`: no token, offline mode or an
  unreachable Hub fail at once with an error that names the fix, and the repo is created.
- `push_task_checkpoint` uploads a task's folder to `task-{i}` (the branch then holds exactly that
  folder's files) and then to `main`. It never raises into the training loop and never modifies the
  local folder: a failure is logged with the command that pushes again, and returned.
- `resolve_pretrained_folder` turns a local folder or a Hub repo id into a local folder, downloading
  safetensors / JSON / text / image / tokenizer files only. Pickle files are never downloaded and
  never unpickled; a repo offering a pickle where safetensors weights are expected is refused.

Example:
    >>> from hf_pmi.hub import check_hub_access, push_task_checkpoint, resolve_pretrained_folder
    >>> check_hub_access("me/clip-digits-pmi")  # doctest: +SKIP
    'https://huggingface.co/me/clip-digits-pmi'
    >>> result = push_task_checkpoint("runs/task-3", "me/clip-digits-pmi", task_id=3)  # doctest: +SKIP
    >>> result.ok, result.branch  # doctest: +SKIP
    (True, 'task-3')
    >>> folder = resolve_pretrained_folder("me/clip-digits-pmi", revision="task-3")  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shlex
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .log import get_logger

logger = get_logger()

#: File name patterns that may hold a pickle. They are never downloaded and never loaded.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]

#: What `resolve_pretrained_folder` downloads by default: weights (safetensors), configs, text and
#: tokenizer files (vocab.json, merges.txt, tokenizer.json, sentencepiece models), cards and plots.
DEFAULT_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.md", "*.png", "*.model", "*.tiktoken"]

# Pickle weight files whose safetensors counterpart has a different stem.
_WEIGHT_RENAMES = {"pytorch_model": "model", "diffusion_pytorch_model": "diffusion_pytorch_model"}
_WEIGHT_STEMS = ("pytorch_model", "model", "adapter_model", "diffusion_pytorch_model")

_TOKEN_FIX = "run `hf auth login` (or set the HF_TOKEN environment variable to a token with write access)"


class HubAccessError(RuntimeError):
    """The Hub cannot be used for pushing; the message says why and how to fix it."""


class UnsafeCheckpointError(ValueError):
    """A repo offers a pickle file where safetensors weights are expected."""


@dataclass
class PushResult:
    """What `push_task_checkpoint` did. Falsy when the push failed.

    Attributes:
        ok: True when the task branch (and `main`, if asked) hold the folder's files.
        repo_id, branch, folder: where from and where to.
        commit_sha: the new head of the task branch (None if that push failed).
        main_commit_sha: the new head of `main` (None if not updated or failed).
        commit_url: URL of the task branch commit.
        error: "ExceptionType: message" when the push failed, else None.
        retry_command: shell commands (`hf upload`) that redo the push.
        retry_python: the Python call that redoes the push.
    """

    ok: bool
    repo_id: str
    branch: str
    folder: str
    commit_sha: str | None = None
    main_commit_sha: str | None = None
    commit_url: str | None = None
    error: str | None = None
    retry_command: str = ""
    retry_python: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _api(token=None, endpoint=None):
    from huggingface_hub import HfApi

    from . import __version__

    return HfApi(endpoint=endpoint, token=token, library_name="hf_pmi", library_version=__version__)


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def check_hub_access(
    repo_id: str,
    token: str | None = None,
    endpoint: str | None = None,
    *,
    private: bool | None = None,
    timeout: float = 10.0,
) -> str:
    """Fail fast, before training, if checkpoints could not be pushed; create the repo if needed.

    Checks, in order: offline mode is off (`HF_HUB_OFFLINE`), a token is available (argument,
    `HF_TOKEN` or `hf auth login`), the Hub answers within `timeout` seconds and accepts the token
    (`HfApi.whoami`), and the token may write. Then creates `repo_id` (`exist_ok=True`), so that later
    pushes only upload.

    Args:
        repo_id: "namespace/name" of the model repo.
        token: a Hub token; defaults to the one `huggingface_hub` finds (HF_TOKEN, then the login file).
        endpoint: Hub URL; defaults to `HF_ENDPOINT` / https://huggingface.co.
        private: visibility of the repo if it is created (None: the Hub's default).
        timeout: seconds to wait for the Hub before declaring it unreachable.

    Returns:
        The repo URL.

    Raises:
        HubAccessError: with the reason and the fix (`hf auth login`, `HF_TOKEN`, `HF_HUB_OFFLINE=0`,
            `push_to_hub=False`, ...).

    Example:
        >>> from hf_pmi.hub import check_hub_access
        >>> check_hub_access("me/clip-digits-pmi")  # doctest: +SKIP
        'https://huggingface.co/me/clip-digits-pmi'
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubAccessError(f"Invalid hub_model_id {repo_id!r}: {e} Use the form 'namespace/name'.") from e
    url = _endpoint(endpoint)
    if huggingface_hub.is_offline_mode():
        raise HubAccessError(
            f"Cannot push to the Hub ({repo_id}): offline mode is on (HF_HUB_OFFLINE=1). "
            "Unset it (`export HF_HUB_OFFLINE=0`) to push, or train with push_to_hub=False."
        )
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubAccessError(
            f"Cannot push to the Hub ({repo_id}): no Hugging Face token found. To fix it, {_TOKEN_FIX}, "
            "or train with push_to_hub=False."
        )
    try:
        who = _whoami(_api(token, url), timeout)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise HubAccessError(
                f"The Hub at {url} rejected the token (401 Unauthorized). To fix it, {_TOKEN_FIX}."
            ) from e
        raise HubAccessError(
            f"The Hub at {url} answered {status} to a token check ({e}). Retry later, or train "
            "with push_to_hub=False."
        ) from e
    except Exception as e:  # connection refused, DNS failure, timeout, proxy error, ...
        raise HubAccessError(
            f"Cannot reach the Hub at {url} ({type(e).__name__}: {e}). Check your network connection and the "
            "HF_ENDPOINT environment variable, or train with push_to_hub=False."
        ) from e
    access = (who.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "read":
        raise HubAccessError(
            f"The token {access.get('displayName', '')!r} is read-only and cannot push to {repo_id}. "
            f"To fix it, {_TOKEN_FIX}."
        )
    try:
        repo_url = _api(token, url).create_repo(repo_id, private=private, exist_ok=True)
    except HfHubHTTPError as e:
        raise HubAccessError(
            f"Cannot create or access the repo {repo_id} on {url}: {e}. Check that the token may write to the "
            f"namespace {repo_id.split('/')[0]!r} ({_TOKEN_FIX})."
        ) from e
    except Exception as e:
        raise HubAccessError(f"Cannot create the repo {repo_id} on {url}: {type(e).__name__}: {e}") from e
    logger.info("Hub access checked: pushes go to %s", repo_url)
    return str(repo_url)


def _whoami(api, timeout: float) -> dict:
    """`HfApi.whoami`, given up after `timeout` seconds (the client itself has no time limit, and a
    Hub that never answers must not hang the start of a run). The call runs in a daemon thread."""
    box: dict = {}

    def call():
        try:
            box["value"] = api.whoami()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=call, name="hf_pmi-whoami", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def upload_folder_to_revision(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
):
    """Create `repo_id` if needed (and branch `revision` from `main` if it does not exist), then upload
    `folder` there in one commit. Returns the `huggingface_hub.CommitInfo`; errors are raised."""
    api = _api(token, endpoint)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)  # the Hub does not create it on upload
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        revision=revision,
        commit_message=commit_message or "hf_pmi: upload ContinualCLIP",
        create_pr=create_pr,
    )


def _retry_instructions(folder: str, repo_id: str, task_id, endpoint: str | None, update_main: bool):
    branch = f"task-{task_id}"
    prefix = f"HF_ENDPOINT={shlex.quote(endpoint)} " if endpoint else ""
    cmd = (
        f"{prefix}hf upload {shlex.quote(repo_id)} {shlex.quote(folder)} . --revision {branch} --delete '*' "
        f"--commit-message {shlex.quote(f'hf_pmi: task {task_id} checkpoint')}"
    )
    if update_main:
        cmd += (
            f" && {prefix}hf upload {shlex.quote(repo_id)} {shlex.quote(folder)} . --delete '*' "
            f"--commit-message {shlex.quote(f'hf_pmi: main follows {branch}')}"
        )
    extra = f", endpoint={endpoint!r}" if endpoint else ""
    extra += "" if update_main else ", update_main=False"
    python = (
        "from hf_pmi.hub import push_task_checkpoint; "
        f"push_task_checkpoint({folder!r}, {repo_id!r}, task_id={task_id!r}{extra})"
    )
    return cmd, python


def _push(folder: str, repo_id: str, task_id, token, endpoint, update_main: bool) -> PushResult:
    branch = f"task-{task_id}"
    cmd, python = _retry_instructions(folder, repo_id, task_id, endpoint, update_main)
    result = PushResult(ok=False, repo_id=repo_id, branch=branch, folder=folder, retry_command=cmd, retry_python=python)
    step = f"create branch {branch}"
    try:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"No checkpoint folder at {folder}")
        api = _api(token, endpoint)
        api.create_branch(repo_id, branch=branch, revision="main", exist_ok=True)
        step = f"upload to {branch}"
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=branch,
            delete_patterns="*",  # the branch holds exactly this folder (.gitattributes is always kept)
            commit_message=f"hf_pmi: task {task_id} checkpoint",
        )
        result.commit_sha, result.commit_url = info.oid, info.commit_url
        if update_main:
            step = "update main"
            main = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision="main",
                delete_patterns="*",
                commit_message=f"hf_pmi: main follows {branch}",
            )
            result.main_commit_sha = main.oid
        result.ok = True
        logger.info("Pushed %s to %s@%s (%s)", folder, repo_id, branch, result.commit_sha)
    except Exception as e:  # never raise into the training loop
        result.error = f"{type(e).__name__}: {e}"
        logger.error(
            "Push of task %s to %s failed at step '%s': %s\nThe local checkpoint %s is intact. "
            "Push it again with:\n  %s\nor from Python:\n  %s",
            task_id,
            repo_id,
            step,
            result.error,
            folder,
            cmd,
            python,
        )
    return result


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_pmi-push")
        return _EXECUTOR


def push_task_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    task_id: int | str,
    token: str | None = None,
    endpoint: str | None = None,
    update_main: bool = True,
    run_as_future: bool = False,
) -> PushResult | Future:
    """Push a finished task's checkpoint folder to branch `task-{task_id}`, then make `main` follow it.

    The branch is created from `main`'s current head if it does not exist, then receives one commit
    that makes it hold exactly the folder's files (files of an older checkpoint are deleted;
    `.gitattributes` is always kept, as on any Hub repo). With `update_main`, `main` receives the
    same content in a second commit. Unchanged files are not re-uploaded.

    Nothing is raised: any failure (network, refused commit, missing folder) is logged on the
    "hf_pmi" logger together with the shell command and the Python call that push again, and is
    returned in the `PushResult`. The local folder is only read.

    Args:
        folder: the local checkpoint folder (e.g. what `save_pretrained` wrote for this task).
        repo_id: "namespace/name"; create it first with `check_hub_access`.
        task_id: index of the finished task; the branch is `task-{task_id}`.
        token, endpoint: as for `huggingface_hub.HfApi`.
        update_main: also make `main` hold this folder (main follows the latest finished task).
        run_as_future: return at once a `concurrent.futures.Future` whose result is the
            `PushResult`. Background pushes run one at a time, in submission order, so `main` ends
            at the latest submitted task. Do not change the folder until the future is done.

    Returns:
        A `PushResult` (falsy on failure), or a `Future` of it with `run_as_future=True`.

    Example:
        >>> from hf_pmi.hub import push_task_checkpoint
        >>> result = push_task_checkpoint("runs/task-1", "me/clip-digits-pmi", task_id=1)  # doctest: +SKIP
        >>> if not result:  # doctest: +SKIP
        ...     print(result.error, result.retry_command)
        >>> future = push_task_checkpoint("runs/task-2", "me/clip-digits-pmi", 2, run_as_future=True)  # doctest: +SKIP
        >>> future.result().commit_sha  # doctest: +SKIP
        '3f2a...'
    """
    folder = os.fspath(folder)
    if run_as_future:
        return _executor().submit(_push, folder, repo_id, task_id, token, endpoint, update_main)
    return _push(folder, repo_id, task_id, token, endpoint, update_main)


def _is_pickle_name(path: str) -> bool:
    name = posixpath.basename(path)
    return any(fnmatch.fnmatchcase(name, p) for p in PICKLE_PATTERNS)


def _expected_safetensors(pickle_path: str) -> str:
    """The safetensors file expected in place of a pickle file (same folder)."""
    folder, name = posixpath.split(pickle_path)
    stem = name.rsplit(".", 1)[0]
    for old, new in _WEIGHT_RENAMES.items():
        if stem == old or stem.startswith(old + "-"):
            stem = new + stem[len(old) :]
            break
    return posixpath.join(folder, stem + ".safetensors")


def _refuse_pickled_weights(files: list[str], scope: str, repo_id: str, revision: str | None) -> None:
    """Raise if a pickle stands where safetensors weights are expected (see `resolve_pretrained_folder`)."""
    in_scope = [f[len(scope) :] for f in files if f.startswith(scope)]
    present = set(in_scope)
    safetensors_dirs = {posixpath.dirname(f) for f in in_scope if f.endswith((".safetensors", ".safetensors.index.json"))}
    for path in sorted(in_scope):
        if not _is_pickle_name(path):
            continue
        expected = _expected_safetensors(path)
        if expected in present or expected + ".index.json" in present:
            continue
        stem = posixpath.basename(expected)[: -len(".safetensors")]
        is_weights = any(stem == w or stem.startswith(w + "-") for w in _WEIGHT_STEMS)
        if is_weights or posixpath.dirname(path) not in safetensors_dirs:
            where = f"{repo_id}@{revision or 'main'}"
            raise UnsafeCheckpointError(
                f"{where} offers {scope + path}, a pickle file, where safetensors weights "
                f"({scope + expected}) are expected. Pickle files can run arbitrary code when loaded, so "
                "hf_pmi never downloads or unpickles them. To fix it, convert the checkpoint to safetensors "
                "in an environment you trust (load it there and call `save_pretrained(folder)`, which writes "
                "safetensors) and push that, or load a revision that has safetensors weights."
            )


def _is_connection_problem(error: Exception) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(error, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"TransportError", "ConnectError", "TimeoutException", "NetworkError"})


def resolve_pretrained_folder(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    subfolder: str | None = None,
    allow_patterns: str | list[str] | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | None = None,
) -> str:
    """A local folder holding the files of `path_or_repo_id` (at `revision`, in `subfolder`).

    A local directory is returned as is (joined with `subfolder`); it is trusted. A Hub repo id is
    resolved to a commit, its file list is checked, and `snapshot_download` fetches only files
    matching `allow_patterns` (default `DEFAULT_ALLOW_PATTERNS`: safetensors, JSON, text, markdown,
    PNG and tokenizer files) under `subfolder`. Files that may hold a pickle (`PICKLE_PATTERNS`) are
    never downloaded, whatever `allow_patterns` says. In offline mode (`HF_HUB_OFFLINE=1`), the
    cached snapshot of the revision is used.

    Args:
        path_or_repo_id: a local folder or a Hub repo id ("namespace/name").
        revision: branch (e.g. "task-3"), tag or commit sha; default `main`.
        subfolder: a folder inside the repo (e.g. "feature_bank"); the returned path points to it.
        allow_patterns: glob patterns (relative to `subfolder`) of the files to download.
        token, endpoint, cache_dir: as for `huggingface_hub.snapshot_download`.

    Returns:
        The local folder path (inside the Hugging Face cache for a repo id).

    Raises:
        UnsafeCheckpointError: the repo has a pickle file where safetensors weights are expected
            (e.g. `pytorch_model.bin` without `model.safetensors`).
        FileNotFoundError: not a local folder nor a repo id, or nothing under `subfolder`.
        huggingface_hub errors: repo or revision not found, Hub unreachable with nothing cached.

    Example:
        >>> from hf_pmi.hub import resolve_pretrained_folder
        >>> resolve_pretrained_folder("runs/task-3")  # doctest: +SKIP
        'runs/task-3'
        >>> resolve_pretrained_folder("me/clip-digits-pmi", revision="task-3", subfolder="feature_bank")  # doctest: +SKIP
        '/home/me/.cache/huggingface/hub/models--me--clip-digits-pmi/snapshots/3f2a.../feature_bank'
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .validation import check_local_path

    path = os.fspath(path_or_repo_id)
    sub = (subfolder or "").strip("/")
    check_local_path(path, "checkpoint folder")  # a missing local folder is reported as such, not as a bad repo id
    if os.path.isdir(path):
        local = os.path.join(path, sub) if sub else path
        if not os.path.isdir(local):
            raise FileNotFoundError(f"{path} has no subfolder {sub!r}.")
        return local
    try:
        validate_repo_id(path)
    except HFValidationError as e:
        raise FileNotFoundError(
            f"{path!r} is neither a local folder nor a Hub repo id ('namespace/name'). Check the path."
        ) from e

    api = _api(token, endpoint)
    resolved = api.resolve_revision(path, revision=revision, cache_dir=cache_dir)
    scope = f"{sub}/" if sub else ""
    patterns = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns or DEFAULT_ALLOW_PATTERNS)
    try:
        files = api.list_repo_files(path, revision=resolved.resolved)
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code < 500:
            raise
        files = None
    except Exception as e:
        if not _is_connection_problem(e):
            raise
        files = None  # offline or unreachable: only the cache is used, and it never holds pickles
    if files is not None:
        _refuse_pickled_weights(files, scope, path, revision)
    folder = snapshot_download(
        path,
        revision=resolved,
        allow_patterns=[scope + p for p in patterns],
        ignore_patterns=PICKLE_PATTERNS,
        cache_dir=cache_dir,
        token=token,
        endpoint=endpoint,
    )
    local = os.path.join(folder, sub) if sub else folder
    if not os.path.isdir(local):
        raise FileNotFoundError(
            f"{path}@{revision or 'main'} has no files matching {patterns} under {sub!r}. "
            "Check the subfolder and allow_patterns."
        )
    return local
