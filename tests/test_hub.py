"""hf_pmi.hub and hf_pmi.model_card against a local Hub server, over real HTTP, with the real client.

The server (tests/hub_server.py) keeps real revisions: each branch its own commits and file set.
Loads that must start from an empty cache run in a fresh subprocess (`hub_server.client_env()`),
because huggingface_hub reads `HF_ENDPOINT` / `HF_HUB_OFFLINE` / the cache folder at import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hub_server import hub_client, hub_server  # noqa: F401  (fixtures)

from hf_pmi.hub import HubAccessError, check_hub_access, push_task_checkpoint
from hf_pmi.resolve import UnsafeCheckpointError, resolve_pretrained_folder
from hf_pmi.model_card import render_model_card, write_model_card

REPO = "tester/continual-clip"


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run(script: str, env: dict, timeout: float = 60) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture
def two_tasks(tmp_path):
    """Two checkpoint folders: task-1 changes a file, drops one, adds one, keeps one."""
    task0 = _write(
        tmp_path / "task0",
        {
            "config.json": b'{"task": 0}',
            "model.safetensors": os.urandom(2048),
            "only_in_task0.txt": b"stale after task 1",
            "feature_bank/config.json": b'{"classes": 2}',
        },
    )
    task1 = _write(
        tmp_path / "task1",
        {
            "config.json": b'{"task": 1}',
            "model.safetensors": os.urandom(4096),
            "only_in_task1.txt": b"new",
            "feature_bank/config.json": b'{"classes": 2}',
        },
    )
    return task0, task1


def test_task_branches_hold_their_own_files_and_main_follows(hub_client, two_tasks):
    task0, task1 = two_tasks
    assert check_hub_access(REPO).endswith(REPO)
    repo = hub_client.repos[REPO]

    first = push_task_checkpoint(task0, REPO, task_id=0)
    assert first.ok and first.branch == "task-0", first.error
    second = push_task_checkpoint(task1, REPO, task_id=1)
    assert second.ok, second.error

    def remote(rev):
        return {p: hashlib.sha256(b).hexdigest() for p, b in repo.files(rev).items() if p != ".gitattributes"}

    assert remote("task-0") == _digest(task0)
    assert remote("task-1") == _digest(task1)
    assert remote("main") == _digest(task1)  # main follows the latest finished task
    assert "only_in_task0.txt" in repo.files("task-0") and "only_in_task0.txt" not in repo.files("task-1")
    assert repo.branches["task-1"] == second.commit_sha and repo.branches["main"] == second.main_commit_sha
    assert repo.branches["task-0"] == first.commit_sha  # untouched by later pushes

    # What the client sees through the API agrees with the server state.
    from huggingface_hub import HfApi

    api = HfApi()
    assert set(api.list_repo_files(REPO, revision="task-0")) == set(_digest(task0)) | {".gitattributes"}
    assert api.model_info(REPO, revision="task-1").sha == second.commit_sha

    # A background push returns a future and keeps the order of submission.
    future = push_task_checkpoint(task0, REPO, task_id=2, run_as_future=True)
    assert future.result(timeout=30).ok
    assert remote("task-2") == _digest(task0) == remote("main")
    assert remote("task-1") == _digest(task1)


def test_fresh_process_downloads_each_revision_exactly(hub_client, two_tasks):
    task0, task1 = two_tasks
    check_hub_access(REPO)
    assert push_task_checkpoint(task0, REPO, 0) and push_task_checkpoint(task1, REPO, 1)

    script = f"""
        import hashlib, json, pathlib
        from huggingface_hub import snapshot_download
        out = {{}}
        for rev in ("task-0", "task-1", "main"):
            root = pathlib.Path(snapshot_download({REPO!r}, revision=rev))
            out[rev] = {{p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".gitattributes"}}
        print(json.dumps(out))
    """
    got = json.loads(_run(script, hub_client.client_env()).strip().splitlines()[-1])
    assert got["task-0"] == _digest(task0)
    assert got["task-1"] == _digest(task1)
    assert got["main"] == _digest(task1)


def test_transformers_loads_a_task_revision_with_identical_outputs(hub_client, tmp_path):
    import torch
    from safetensors.torch import load_file

    from hf_pmi.testing import build_clip

    check_hub_access(REPO)
    models = {}
    for task in (0, 1):
        models[task] = build_clip("tiny", seed=task)
        models[task].save_pretrained(tmp_path / f"task{task}")
        assert push_task_checkpoint(tmp_path / f"task{task}", REPO, task_id=task)

    script = f"""
        import torch
        from safetensors.torch import save_file
        from transformers import CLIPModel
        torch.manual_seed(0)
        pixels = torch.rand(2, 3, 32, 32)
        ids = torch.tensor([[512, 70, 71, 513], [512, 72, 73, 513]])
        out = {{}}
        for rev in ("task-0", "task-1"):
            model = CLIPModel.from_pretrained({REPO!r}, revision=rev).eval()
            with torch.no_grad():
                out[rev] = model(input_ids=ids, pixel_values=pixels).logits_per_image.contiguous()
        save_file(out, {str(tmp_path / "outputs.safetensors")!r})
    """
    _run(script, hub_client.client_env(), timeout=120)
    remote = load_file(tmp_path / "outputs.safetensors")

    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32)
    ids = torch.tensor([[512, 70, 71, 513], [512, 72, 73, 513]])
    for task in (0, 1):
        with torch.no_grad():
            local = models[task](input_ids=ids, pixel_values=pixels).logits_per_image
        assert torch.equal(remote[f"task-{task}"], local)
    assert not torch.equal(remote["task-0"], remote["task-1"])
    assert not any(path.endswith((".bin", ".pt", ".pth")) for _, path, _ in hub_client.requests)


def test_refused_commit_is_reported_not_raised_and_a_later_push_succeeds(hub_client, two_tasks, caplog):
    task0, task1 = two_tasks
    check_hub_access(REPO)
    before = _digest(task0)

    hub_client.fail_next_commits(3, status=500)  # the first push and its two retries
    with caplog.at_level(logging.ERROR, logger="hf_pmi"):
        result = push_task_checkpoint(task0, REPO, task_id=0)
    assert not result and result.commit_sha is None
    assert "500" in result.error
    assert "hf upload tester/continual-clip" in result.retry_command and "--revision task-0" in result.retry_command
    assert "push_task_checkpoint(" in result.retry_python
    assert result.retry_command in caplog.text and "intact" in caplog.text
    assert _digest(task0) == before  # the local folder is untouched
    assert "config.json" not in hub_client.repos[REPO].files("task-0")

    again = push_task_checkpoint(task0, REPO, task_id=0)
    assert again.ok, again.error
    assert set(hub_client.repos[REPO].files("task-0")) == set(before) | {".gitattributes"}

    # A failure in the background is reported through the future's result, not raised.
    hub_client.fail_next_commits(3, status=503)
    assert not push_task_checkpoint(task1, REPO, task_id=5, run_as_future=True).result(timeout=30)
    assert _digest(task1) and hub_client.repos[REPO].files("task-5") == hub_client.repos[REPO].files("main")


def test_check_hub_access_fails_fast_naming_the_fix(hub_client, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAccessError, match="hf auth login") as info:
        check_hub_access(REPO)
    assert "HF_TOKEN" in str(info.value)
    assert REPO not in hub_client.repos

    hub_client.valid_tokens = {"hf_good"}
    with pytest.raises(HubAccessError, match="rejected the token.*hf auth login"):
        check_hub_access(REPO, token="hf_revoked")
    assert check_hub_access(REPO, token="hf_good").endswith(REPO)

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(HubAccessError, match="Cannot reach the Hub") as info:
        check_hub_access(REPO, token="hf_x", endpoint=dead, timeout=2)
    assert time.monotonic() - start < 5 and "HF_ENDPOINT" in str(info.value)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE"):
        check_hub_access(REPO, token="hf_x")


def test_resolve_pretrained_folder_never_downloads_pickles(hub_client, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tester/pickled")
    _write(tmp_path / "pickled", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04not really a pickle"})
    api.upload_folder(repo_id="tester/pickled", folder_path=tmp_path / "pickled")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*model\.safetensors"):
        resolve_pretrained_folder("tester/pickled")

    # Safetensors next to pickles of other kinds: only the safe files are downloaded.
    api.create_repo("tester/mixed")
    _write(
        tmp_path / "mixed",
        {
            "model.safetensors": b"weights",
            "training_args.bin": b"pickle",
            "feature_bank/feature_bank.safetensors": b"bank",
            "feature_bank/config.json": b"{}",
            "feature_bank/extra.pt": b"pickle",
        },
    )
    api.upload_folder(repo_id="tester/mixed", folder_path=tmp_path / "mixed")
    folder = Path(resolve_pretrained_folder("tester/mixed", allow_patterns=["*.safetensors", "*.json", "*.bin"]))
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "feature_bank/config.json",
        "feature_bank/feature_bank.safetensors",
        "model.safetensors",
    ]
    bank = Path(resolve_pretrained_folder("tester/mixed", subfolder="feature_bank"))
    assert bank.name == "feature_bank" and (bank / "feature_bank.safetensors").read_bytes() == b"bank"
    assert not any(path.endswith((".bin", ".pt")) for method, path, _ in hub_client.requests if "/resolve/" in path)

    # A local folder is returned as is; a revision picks that revision's files.
    assert resolve_pretrained_folder(str(tmp_path / "mixed")) == str(tmp_path / "mixed")
    api.create_branch("tester/mixed", branch="task-0")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="model.safetensors", repo_id="tester/mixed", revision="task-0")
    assert (Path(resolve_pretrained_folder("tester/mixed", revision="task-0")) / "model.safetensors").read_bytes() == b"v2"
    assert (Path(resolve_pretrained_folder("tester/mixed")) / "model.safetensors").read_bytes() == b"weights"


CARD_STATE = {
    "base_model": "openai/clip-vit-base-patch16",
    "dataset": "uoft-cs/cifar100",
    "method": {"name": "PMI + LoRA", "lora_r": 8, "replay_per_class": 5},
    "class_order": [3, 0, 2, 1],
    "class_names": ["apple", "bee", "cat", "dog"],
    "accuracy_matrix": [[0.95, None], [0.8125, 0.9]],
    "a_last": 0.856,
    "a_avg": 0.903,
    "forgetting": 0.1375,
    "bwt": -0.1375,
    "task_id": 1,
    "num_tasks": 2,
    "inversion": {"pmi_steps": 200, "refine_steps": 600, "seconds": 41.5, "full_model_passes": 600},
    "repo_id": REPO,
    "replay_grid": "replay_grid.png",
    "tags": ["cifar100"],
}


def test_model_card_renders_valid_metadata_and_the_matrix(hub_client, tmp_path):
    from huggingface_hub import ModelCard

    text = render_model_card(CARD_STATE)
    card = ModelCard(text)
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.base_model == "openai/clip-vit-base-patch16" and card.data.datasets == ["uoft-cs/cifar100"]
    assert {"hf_pmi", "continual-learning", "cifar100"} <= set(card.data.tags)
    assert "| After task | Task 0 | Task 1 |" in text
    assert "| 1 | 81.25 | 90.00 |" in text and "| 0 | 95.00 | – |" in text
    assert "| BWT | -13.75 |" in text and "| A_last | 85.60 |" in text
    assert 'revision="task-1"' in text and 'subfolder="feature_bank"' in text
    assert "ContinualTrainer.from_pretrained" in text and "not a privacy guarantee" in text
    assert "@inproceedings" in text and "2510.26311" in text
    assert "600 full-model" in text and "![Replay samples](replay_grid.png)" in text
    card.validate()  # the (local) Hub's validate-yaml accepts it

    folder = tmp_path / "card"
    readme = write_model_card(folder, CARD_STATE)
    assert (folder / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Accuracy matrix](accuracy_matrix.png)" in Path(readme).read_text()

    # Pushed with the checkpoint, the card goes through the Hub's metadata check and lands on the branch.
    check_hub_access(REPO)
    assert push_task_checkpoint(folder, REPO, task_id=1)
    assert any("/api/validate-yaml" in path for _, path, _ in hub_client.requests)
    assert hub_client.repos[REPO].files("task-1")["README.md"] == Path(readme).read_bytes()

    minimal = render_model_card({"accuracy_matrix": [[0.5]], "num_tasks": 1, "task_id": 0, "base_model": "/tmp/x"})
    assert ModelCard(minimal).data.base_model is None  # a local path is not Hub metadata
    with pytest.raises(ValueError, match="num_tasks"):
        render_model_card({"accuracy_matrix": [[0.5]]})


def test_a_push_that_fails_once_is_retried_and_a_missing_folder_is_not(hub_client, two_tasks, tmp_path):
    task0, _ = two_tasks
    check_hub_access(REPO)
    hub_client.fail_next_commits(1, status=502)  # a passing Hub error
    result = push_task_checkpoint(task0, REPO, task_id=0)
    assert result.ok and "config.json" in hub_client.repos[REPO].files("task-0")
    missing = push_task_checkpoint(tmp_path / "nowhere", REPO, task_id=1, retries=5)
    assert not missing and "FileNotFoundError" in missing.error  # not transient: at once, no waiting
