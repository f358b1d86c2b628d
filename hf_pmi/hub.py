"""Hugging Face Hub plumbing for continual runs: one branch per task, `main` follows the latest task.

A continual run pushes the checkpoint of every finished task to its own branch, `task-{i}`, so any
step of the sequence can be reloaded with `revision="task-{i}"`, and `main` always holds the latest
task. Two functions, both built on `huggingface_hub` (downloads live in `hf_pmi.resolve`):

- `check_hub_access` runs *before* training when `push_to_hub=True`: no token, offline mode or an
  unreachable Hub fail at once with an error that names the fix, and the repo is created.
- `push_task_checkpoint` uploads a task's folder to `task-{i}` (the branch then holds exactly that
  folder's files) and then to `main`. It never raises into the training loop and never modifies the
  local folder: a failure is logged with the command that pushes again, and returned.

Example:
    >>> from hf_pmi.hub import check_hub_access, push_task_checkpoint
    >>> check_hub_access("me/clip-digits-pmi")  # doctest: +SKIP
    'https://huggingface.co/me/clip-digits-pmi'
    >>> result = push_task_checkpoint("runs/task-3", "me/clip-digits-pmi", task_id=3)  # doctest: +SKIP
    >>> result.ok, result.branch  # doctest: +SKIP
    (True, 'task-3')
"""

from __future__ import annotations

import functools
import os
import shlex
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from .log import get_logger
from .resolve import hub_api

logger = get_logger()

_TOKEN_FIX = "run `hf auth login` (or set the HF_TOKEN environment variable to a token with write access)"


class HubAccessError(RuntimeError):
    """The Hub cannot be used for pushing; the message says why and how to fix it."""


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
        who = _whoami(hub_api(token, url), timeout)
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
        repo_url = hub_api(token, url).create_repo(repo_id, private=private, exist_ok=True)
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


def _push(folder: str, repo_id: str, task_id, token, endpoint, update_main: bool, result: PushResult):
    """One attempt; returns ``(error, step)`` (None on success) and fills `result`."""
    branch = f"task-{task_id}"
    step = f"create branch {branch}"
    try:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"No checkpoint folder at {folder}")
        api = hub_api(token, endpoint)
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
        result.ok, result.error = True, None
        logger.info("Pushed %s to %s@%s (%s)", folder, repo_id, branch, result.commit_sha)
        return None, step
    except Exception as e:  # never raise into the training loop
        result.error = f"{type(e).__name__}: {e}"
        return e, step


def _transient(error: Exception) -> bool:
    """A failure that a later attempt may not meet: the Hub busy or erring (429, 5xx), or the network."""
    from .resolve import _is_connection_problem

    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return _is_connection_problem(error) or (isinstance(status, int) and (status == 429 or status >= 500))


#: Seconds before the second attempt of a push that failed transiently (doubling for each further attempt).
RETRY_WAIT = 0.5


def _push_with_retries(folder: str, repo_id: str, task_id, token, endpoint, update_main: bool,
                       retries: int) -> PushResult:
    cmd, python = _retry_instructions(folder, repo_id, task_id, endpoint, update_main)
    result = PushResult(ok=False, repo_id=repo_id, branch=f"task-{task_id}", folder=folder, retry_command=cmd,
                        retry_python=python)
    for attempt in range(retries + 1):
        error, step = _push(folder, repo_id, task_id, token, endpoint, update_main, result)
        if error is None or attempt == retries or not _transient(error):
            break
        logger.warning("Push of task %s to %s failed at step '%s' (%s); attempt %d of %d in %.1f s.", task_id,
                       repo_id, step, result.error, attempt + 2, retries + 1, RETRY_WAIT * 2 ** attempt)
        time.sleep(RETRY_WAIT * 2 ** attempt)
    if error is not None:
        logger.error(
            "Push of task %s to %s failed at step '%s' (after %d attempt(s)): %s\nThe local checkpoint %s is intact. "
            "Push it again with:\n  %s\nor from Python:\n  %s",
            task_id, repo_id, step, attempt + 1, result.error, folder, cmd, python,
        )
    return result


def exit_if_pushes_failed(failed: list) -> None:
    """End a command-line run with exit status 1 when any push failed (a run whose tasks did not all reach the
    Hub must not look successful), after printing each failed push's retry command. The local task folders
    are intact. `failed`: `PushResult` objects (or dicts with ``folder``, ``error`` and ``retry_command``)."""
    if not failed:
        return
    lines = [f"[hf_pmi] {len(failed)} push(es) to the Hub failed; the local checkpoints are intact. Push again with:"]
    for push in failed:
        get = push.get if isinstance(push, dict) else lambda key: getattr(push, key, None)
        lines.append(f"  # {get('folder')}: {get('error') or 'failed'}\n  {get('retry_command')}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    raise SystemExit(1)


@functools.lru_cache(maxsize=8)
def _push_api(token: str | None, endpoint: str | None):
    """One `HfApi` per token and endpoint: its `run_as_future` runs that client's pushes one at a time, in order."""
    return hub_api(token, endpoint)


def push_task_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    task_id: int | str,
    token: str | None = None,
    endpoint: str | None = None,
    update_main: bool = True,
    run_as_future: bool = False,
    retries: int = 2,
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
            `PushResult` (`HfApi.run_as_future`). Background pushes with the same token and endpoint run
            one at a time, in submission order, so `main` ends at the latest submitted task. Do not change
            the folder until the future is done.
        retries: attempts after the first when a push fails transiently (the Hub busy or erring, the
            network), waiting `RETRY_WAIT` seconds, then twice as long, ...; other failures are not retried.

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
        return _push_api(token, endpoint).run_as_future(_push_with_retries, folder, repo_id, task_id, token, endpoint,
                                                        update_main, retries)
    return _push_with_retries(folder, repo_id, task_id, token, endpoint, update_main, retries)
