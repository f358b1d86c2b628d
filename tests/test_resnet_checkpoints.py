"""Per-task checkpoints, resume after SIGKILL and Hub branches of the BN family's loop
(`hf_pmi.resnet.continual.learn_tasks` with ``output_dir`` / ``hub_model_id``)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hub_server import TEST_TOKEN, hub_client, hub_server  # noqa: F401  (fixtures)
from test_resnet_continual import colour_tasks, config, tiny_model

from hf_pmi.integrity import ChecksumError
from hf_pmi.resnet import ResNet32ForImageClassification
from hf_pmi.resnet.continual import learn_tasks

TESTS = os.path.dirname(__file__)

# A child process: 3 tasks of pmi on the tiny ResNet into argv[1]; with argv[2] = n it SIGKILLs itself at the
# n-th training task (after the earlier tasks' folders were written). Prints the result as JSON.
RUN = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_resnet_continual import colour_tasks, config, tiny_model
    from hf_pmi.resnet import continual
    if len(sys.argv) > 2:
        calls, kill_at, train_task = [0], int(sys.argv[2]), continual.Learner.train_task
        def killing(self, *a, **k):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return train_task(self, *a, **k)
        continual.Learner.train_task = killing
    result = continual.learn_tasks(tiny_model(), colour_tasks(num_tasks=3), config("pmi"), output_dir=sys.argv[1])
    print(json.dumps({{k: result[k] for k in ("accuracy_matrix", "inverted_classes", "losses")}}))
""").format(tests=TESTS)


def _run(tmp_path, out, *extra):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(out), *extra], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_a_run_killed_in_task_2_resumes_to_the_same_result_without_reinverting(tmp_path):
    whole = _run(tmp_path, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    killed = _run(tmp_path, tmp_path / "killed", "3")  # SIGKILL as task 2 starts training
    assert killed.returncode == -9
    assert sorted(os.listdir(tmp_path / "killed")) == [".hf_pmi_run.lock", "task-0", "task-1"]  # stale lock left
    resumed = _run(tmp_path, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(whole.stdout), json.loads(resumed.stdout)
    assert b["accuracy_matrix"] == a["accuracy_matrix"]  # bit-equal floats: same training to the last step
    assert b["losses"] == a["losses"]
    # the resumed run inverts exactly what the uninterrupted one does: every seen class again after each task (the
    # reference's regenerated pool), the saved last task's classes too (a checkpoint to continue from)
    assert b["inverted_classes"] == a["inverted_classes"] == {"0": 3, "1": 3, "2": 2, "3": 2, "4": 1, "5": 1}
    state = json.loads((tmp_path / "killed" / "task-2" / "continual_state.json").read_text())
    assert state["accuracy_matrix"] == a["accuracy_matrix"]


def test_task_folders_load_and_refuse_corruption_or_other_settings(tmp_path):
    tasks = colour_tasks()
    model = tiny_model()
    result = learn_tasks(model, tasks, config("pmi"), output_dir=str(tmp_path))
    folder = tmp_path / "task-1"
    assert {"config.json", "model.safetensors", "replay_state.safetensors", "continual_state.json", "README.md",
            "feature_bank"} <= set(os.listdir(folder))
    card = (folder / "README.md").read_text()
    assert "after task 1" in card and "every seen class anew" in card  # the card says what the run did
    assert "| loss_form | `\"sum\"` |" in card and "not a privacy guarantee" in card
    x = tasks[0].x_test
    with torch.no_grad():
        again = ResNet32ForImageClassification.from_pretrained(str(folder)).eval()
        assert torch.equal(again(pixel_values=x).logits, model.eval()(pixel_values=x).logits)
    # a finished run: calling again with the same settings returns the stored matrix, trains nothing
    assert learn_tasks(tiny_model(), tasks, config("pmi"), output_dir=str(tmp_path))["accuracy_matrix"] == \
        result["accuracy_matrix"]
    with pytest.raises(ValueError, match=r"other settings \['epochs'\].*another output_dir"):
        learn_tasks(tiny_model(), tasks, config("pmi", epochs=3), output_dir=str(tmp_path))
    replay = folder / "replay_state.safetensors"
    data = bytearray(replay.read_bytes())
    data[-1] ^= 1  # one flipped bit in the replay pool
    replay.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="replay_state.safetensors is corrupt"):
        learn_tasks(tiny_model(), tasks, config("pmi"), output_dir=str(tmp_path))


def test_each_task_is_pushed_to_its_branch_and_every_revision_reloads_with_identical_logits(tmp_path, hub_client):  # noqa: F811
    from huggingface_hub import HfApi

    tasks = colour_tasks(num_tasks=3)
    out = tmp_path / "run"
    result = learn_tasks(tiny_model(), tasks, config("pmi"), output_dir=str(out), hub_model_id="tester/resnet-pmi",
                         hub_token=TEST_TOKEN)
    assert [p["ok"] for p in result["pushes"]] == [True, True, True]
    refs = {b.name for b in HfApi().list_repo_refs("tester/resnet-pmi").branches}
    assert {"main", "task-0", "task-1", "task-2"} <= refs
    x = torch.cat([t.x_test for t in tasks])
    for t in range(3):
        local = ResNet32ForImageClassification.from_pretrained(str(out / f"task-{t}")).eval()
        hub = ResNet32ForImageClassification.from_pretrained("tester/resnet-pmi", revision=f"task-{t}").eval()
        with torch.no_grad():
            assert torch.equal(hub(pixel_values=x).logits, local(pixel_values=x).logits)
        assert hub.config.num_labels == 2 * (t + 1)


def test_hub_push_needs_an_output_dir_and_is_checked_before_work(tmp_path):
    with pytest.raises(ValueError, match="needs output_dir"):
        learn_tasks(tiny_model(), colour_tasks(), config("finetune"), hub_model_id="tester/x")
    # offline (the tests' default): refused before any training, and nothing written
    with pytest.raises(Exception, match="(?i)offline"):
        learn_tasks(tiny_model(), colour_tasks(), config("finetune"), output_dir=str(tmp_path / "o"),
                    hub_model_id="tester/x")
    assert not (tmp_path / "o").exists()
