"""Hub repo or local folder -> a local folder of safetensors, JSON and text files; pickles never.

`resolve_pretrained_folder` is how every loader of hf_pmi (`ContinualCLIP`, `FeatureBank`,
`ContinualTrainer.from_pretrained`, ``hf-pmi eval``) reads a checkpoint: a local directory is
used as is; a Hub repo id is resolved to a commit, its file list is checked, and only files
matching the allowed patterns are downloaded. Files that may hold a pickle (`PICKLE_PATTERNS`)
are never downloaded and never unpickled, and a repo that offers a pickle where safetensors
weights are expected is refused (`UnsafeCheckpointError`). Uploads live in `hf_pmi.hub`.

Example:
    >>> from hf_pmi.resolve import is_pickle_name, resolve_pretrained_folder
    >>> is_pickle_name("model.ckpt"), is_pickle_name("model.safetensors")
    (True, False)
    >>> folder = resolve_pretrained_folder("me/clip-digits-pmi", revision="task-3")  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import functools
import os
import posixpath

from .validation import check_local_path, looks_like_local_path

#: File name patterns that may hold a pickle. They are never downloaded and never loaded.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]

#: What `resolve_pretrained_folder` downloads by default: weights (safetensors), configs, text and
#: tokenizer files (vocab.json, merges.txt, tokenizer.json, sentencepiece models), cards and plots.
DEFAULT_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.md", "*.png", "*.model", "*.tiktoken"]

# Pickle weight files whose safetensors counterpart has a different stem.
_WEIGHT_RENAMES = {"pytorch_model": "model", "diffusion_pytorch_model": "diffusion_pytorch_model"}
_WEIGHT_STEMS = ("pytorch_model", "model", "adapter_model", "diffusion_pytorch_model")


class UnsafeCheckpointError(ValueError):
    """A repo offers a pickle file where safetensors weights are expected."""


def hub_api(token=None, endpoint=None):
    """An `HfApi` that names hf_pmi (and its version) in its user agent."""
    from huggingface_hub import HfApi

    from .version import __version__

    return HfApi(endpoint=endpoint, token=token, library_name="hf_pmi", library_version=__version__)


def hub_repo_id(name) -> str | None:
    """`name` when it is a Hub repo id ("namespace/name" or "name"), None for anything else: empty, a local
    path (even one that is no longer there), or a string the Hub would refuse. A model whose base has no
    Hub id must carry that base's weights, since nobody else could load it by its name.

    Example:
        >>> hub_repo_id("openai/clip-vit-base-patch16"), hub_repo_id("/home/me/clip"), hub_repo_id("")
        ('openai/clip-vit-base-patch16', None, None)
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str) or not name:
        return None
    if looks_like_local_path(name) or os.path.exists(os.path.expanduser(name)):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


@functools.lru_cache(maxsize=32)  # one look-up per base model and process (every task writes a card)
def hub_model_license(repo_id: str | None, token: str | None = None, timeout: float = 10.0) -> str | None:
    """The licence id in the Hub card of model `repo_id` (e.g. "mit"), or None when it cannot be known: no
    Hub id, offline mode, the Hub unreachable within `timeout` seconds, or a card without one. Never raises.

    Example:
        >>> hub_model_license("openai/clip-vit-base-patch16")  # doctest: +SKIP
        'other'
    """
    import huggingface_hub

    if hub_repo_id(repo_id) is None or huggingface_hub.is_offline_mode():
        return None
    try:
        card = hub_api(token).model_info(repo_id, timeout=timeout).card_data
    except Exception:  # the card is informative: a Hub problem must not stop a run
        return None
    license_id = card.get("license") if card is not None else None
    return license_id if isinstance(license_id, str) and license_id else None


def is_pickle_name(path: str) -> bool:
    """True for a file name that may hold a pickle (`PICKLE_PATTERNS`)."""
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
        if not is_pickle_name(path):
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
        >>> from hf_pmi.resolve import resolve_pretrained_folder
        >>> resolve_pretrained_folder("runs/task-3")  # doctest: +SKIP
        'runs/task-3'
        >>> resolve_pretrained_folder("me/clip-digits-pmi", revision="task-3", subfolder="feature_bank")  # doctest: +SKIP
        '/home/me/.cache/huggingface/hub/models--me--clip-digits-pmi/snapshots/3f2a.../feature_bank'
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id


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

    api = hub_api(token, endpoint)
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


def keep_local_name(config) -> None:
    """Make a model config's ``_name_or_path`` absolute when it names an existing local folder, so that a
    relative path ("base", "models/clip") is never taken for a Hub id later (from another directory, or once
    moved): a LoRA checkpoint on such a base then keeps the base's weights (`ContinualCLIP.save_pretrained`)."""
    name = getattr(config, "_name_or_path", "")
    if isinstance(name, str) and name and os.path.isdir(os.path.expanduser(name)):
        config._name_or_path = os.path.abspath(os.path.expanduser(name))


def load_pinned(model_cls, name, **kwargs):
    """``(model_cls.from_pretrained(name, **kwargs), commit)``: a Hub repo id is resolved to the commit it is
    loaded at (returned, so that a checkpoint can record it and load that same base again) and only its
    safetensors weights are read (``use_safetensors=True``: a pickle is never downloaded). A local folder is
    loaded as is (commit None); its config's name becomes absolute (`keep_local_name`).

    Raises:
        UnsafeCheckpointError: the repo offers pickled weights (e.g. ``pytorch_model.bin``) and no safetensors.

    Example:
        >>> from transformers import CLIPModel
        >>> clip, commit = load_pinned(CLIPModel, "openai/clip-vit-base-patch16")  # doctest: +SKIP
        >>> commit  # doctest: +SKIP
        '57c216476eefef5ab752ec549e440a49ae4ae5f3'
    """
    path = os.fspath(name)
    if os.path.isdir(os.path.expanduser(path)) or hub_repo_id(path) is None:
        model = model_cls.from_pretrained(path, **kwargs)
        keep_local_name(model.config)
        return model, None
    kwargs["use_safetensors"] = True  # the README's promise: no pickle is ever loaded from the Hub
    commit = None
    try:
        commit = hub_api(kwargs.get("token")).resolve_revision(
            path, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir")).resolved
        kwargs["revision"] = commit
    except Exception as e:  # unreachable and nothing cached, no such repo: from_pretrained names the problem
        if not _is_connection_problem(e) and type(e).__name__ not in ("RepositoryNotFoundError", "RevisionNotFoundError"):
            raise
    try:
        return model_cls.from_pretrained(path, **kwargs), commit
    except OSError as e:
        try:
            files = hub_api(kwargs.get("token")).list_repo_files(path, revision=kwargs.get("revision"))
        except Exception:
            raise e from None
        _refuse_pickled_weights(files, (kwargs.get("subfolder") or "").strip("/") + "/" if kwargs.get("subfolder")
                                else "", path, kwargs.get("revision"))
        raise
