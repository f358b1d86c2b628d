"""Training with push_to_hub against the local Hub server (real HTTP, real client), and continuing
from a Hub checkpoint. Loads from an empty cache run in a fresh subprocess."""

import dataclasses
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from configs import fast_pmi
from hub_server import hub_client, hub_server  # noqa: F401  (fixtures)

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.bank import FeatureBank
from hf_pmi.hub import HubAccessError
from hf_pmi.testing import build_clip

REPO = "tester/clip-digits-pmi"
FAST_PMI = fast_pmi(grid_samples=8)


def args_for(tmp_path, name, **kw):
    return ContinualConfig(output_dir=str(tmp_path / name), method="pmi", max_steps=2, per_device_train_batch_size=16,
                           warmup_steps=0, disable_tqdm=True, logging_steps=100,
                           head_projection_dim=500,  # a 4 MB head: the test server takes bodies up to 64 MB
                           push_to_hub=True, hub_model_id=REPO, **kw)


def first_tasks(digits):
    """Tasks 0-1 of a 5-task split (the original run) and task 2 as new data for a continued run."""
    tasks = split_class_incremental(digits, num_tasks=5, seed=0)
    old = dataclasses.replace(tasks, tasks=tasks.tasks[:2], class_order=tasks.class_order[:4],
                              class_names=tasks.class_names[:4])
    new_task = dataclasses.replace(tasks[2], task_id=0, class_ids=[0, 1])
    new = dataclasses.replace(tasks, tasks=[new_task], class_order=tasks.class_order[4:6],
                              class_names=tasks.class_names[4:6])
    return old, new


def hub_logits(server, revision, x_path):
    script = f"""
        import json, torch
        from hf_pmi import ContinualCLIP
        from hf_pmi.bank import FeatureBank
        model = ContinualCLIP.from_pretrained({REPO!r}, revision={revision!r}).eval()
        bank = FeatureBank.from_pretrained({REPO!r}, revision={revision!r}, subfolder="feature_bank")
        with torch.no_grad():
            logits = model(pixel_values=torch.load({str(x_path)!r})).logits
        print(json.dumps({{"logits": logits.tolist(), "means": bank.means.tolist()}}))
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=server.client_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_push_per_task_reload_each_revision_and_continue(tmp_path, hub_client, digits, processor):
    old, new = first_tasks(digits)
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=args_for(tmp_path, "run"),
                               tasks=old, processing_class=processor, method_config=FAST_PMI)
    trainer.train()
    repo = hub_client.repos[REPO]
    main, task0, task1 = repo.files("main"), repo.files("task-0"), repo.files("task-1")
    assert main == task1 and task0 != task1
    for files in (task0, task1):
        assert {"README.md", "continual_state.json", "accuracy_matrix.png", "feature_bank/feature_bank.safetensors",
                "clip/model.safetensors", "class_prompts.safetensors"} <= set(files)
    assert "replay_samples.png" in task1
    assert b"task-1" in task1["README.md"] and b"not a privacy guarantee" in task1["README.md"]

    x = torch.rand(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    for t in range(2):
        local = ContinualCLIP.from_pretrained(tmp_path / "run" / f"task-{t}").eval()
        with torch.no_grad():
            expected = local(pixel_values=x).logits
        remote = hub_logits(hub_client, f"task-{t}", tmp_path / "x.pt")
        assert torch.equal(torch.tensor(remote["logits"]), expected)
        bank = FeatureBank.from_pretrained(tmp_path / "run" / f"task-{t}" / "feature_bank")
        assert torch.equal(torch.tensor(remote["means"]), bank.means)

    # someone else continues from task-1, data-free, and pushes task-2
    args = args_for(tmp_path, "continued")
    cont = ContinualTrainer.from_pretrained(REPO, tasks=new, args=args, revision="task-1",
                                            method_config=FAST_PMI)
    assert cont.method.buffer is not None and cont.method.buffer[1].unique().tolist() == [0, 1, 2, 3]
    result = cont.train()
    assert len(result.accuracy_matrix) == 3 and result.accuracy_matrix[2][2] is not None
    assert result.accuracy_matrix[2][:2] == [None, None]  # old tasks: no data here, by design
    # nothing claims what was not measured (#31): A_last says which tasks it covers, forgetting / BWT unknown
    assert result.forgetting is None and result.bwt is None and result.unevaluated_tasks == [0, 1]
    card = repo.files("task-2")["README.md"].decode()
    assert "tasks 0, 1 were not evaluated" in card and "no old task was evaluated" in card, card
    assert "over all seen classes" not in card
    state = json.loads(repo.files("task-2")["continual_state.json"])
    assert state["task_id"] == 2 and state["seen_classes"] == old.class_names + new.class_names
    assert repo.files("main") == repo.files("task-2")

    with pytest.raises(ValueError, match="already exist"):
        ContinualTrainer.from_pretrained(REPO, tasks=old, args=args_for(tmp_path, "dup"), revision="task-1",
                                         method_config=FAST_PMI)


def test_refused_upload_keeps_training_and_logs_how_to_retry(tmp_path, hub_client, digits, processor, caplog):
    old, _ = first_tasks(digits)
    hub_client.fail_next_commits(3)  # the push of task-0 is refused, and its two retries
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=args_for(tmp_path, "run"),
                               tasks=old, processing_class=processor, method_config=FAST_PMI)
    with caplog.at_level(logging.ERROR, logger="hf_pmi"):
        result = trainer.train()
    assert len(result.accuracy_matrix) == 2  # training went on
    assert "hf upload" in caplog.text and "task-0" in caplog.text
    assert (tmp_path / "run" / "task-0" / "continual_state.json").exists()
    repo = hub_client.repos[REPO]
    assert repo.files("main") == repo.files("task-1")
    from hf_pmi.hub import push_task_checkpoint

    retry = push_task_checkpoint(tmp_path / "run" / "task-0", REPO, 0, update_main=False)
    assert retry.ok and "continual_state.json" in repo.files("task-0")


def test_push_to_hub_without_token_fails_before_training(tmp_path, hub_client, monkeypatch, digits, processor):
    monkeypatch.delenv("HF_TOKEN")
    old, _ = first_tasks(digits)
    with pytest.raises(HubAccessError, match="hf auth login"):
        ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=args_for(tmp_path, "run"),
                         tasks=old, processing_class=processor)
    assert not (tmp_path / "run" / "task-0").exists()


def test_push_to_hub_with_unreachable_hub_fails_before_training(tmp_path, hub_client, monkeypatch, digits,
                                                                 processor):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    old, _ = first_tasks(digits)
    with pytest.raises(HubAccessError, match="Cannot reach the Hub"):
        ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=args_for(tmp_path, "run"),
                         tasks=old, processing_class=processor)


def test_bank_stored_as_pickle_on_the_hub_is_refused(tmp_path, hub_client):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    (tmp_path / "fb").mkdir()
    torch.save({"means": torch.zeros(2, 4)}, tmp_path / "fb" / "feature_bank.pt")
    api.upload_folder(folder_path=tmp_path / "fb", path_in_repo="feature_bank", repo_id=REPO)
    with pytest.raises(ValueError, match="(?i)pickle"):
        FeatureBank.from_pretrained(REPO, subfolder="feature_bank")
