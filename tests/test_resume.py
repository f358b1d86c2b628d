"""Nothing lost: the default digits recipe (letters backbone + LoRA), SIGKILLed anywhere and resumed with its own
``--resume_from_checkpoint true``, ends exactly as an uninterrupted run; and one seed gives one result.

The recipe runs as a user runs it (subprocesses). Kill points are deterministic and live in the tests
(`kill_points`, wrapped around hf_pmi from outside): the process SIGKILLs itself at the n-th training step,
module call of the work between tasks, or task save. Independent runs go in parallel to keep the wall time low.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the default recipe at small settings: 5 tasks, tiny model, 2 steps per task, a minimal inversion
SMALL = ["--model_size", "tiny", "--max_steps", "2", "--per_device_train_batch_size", "16", "--disable_tqdm", "true",
         "--per_device_eval_batch_size", "512", "--seed", "3"]
PMI = ["--method", "pmi", "--inversion_layer_steps", "3", "--inversion_first_block_steps", "4", "--inversion_upsample_at", "1", "2", "3",
       "--inversion_refine_steps", "3", "--sampling_selection", "gaussian", "--sampling_per_class", "2", "--replay_grid_samples", "4"]


def start(out, extra=(), kill_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    cmd = ["recipes/clip_digits.py", "--output_dir", str(out), *SMALL, *extra]
    if kill_at:  # the test-only kill points (tests/kill_points.py) wrap the recipe's run
        cmd = ["-c", "import kill_points; kill_points.main()", kill_at, *cmd]
    cmd = [sys.executable, *cmd]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def results(out):
    return json.loads((out / "results.json").read_text())


def done_tasks(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("task-") and (p / "continual_state.json").exists())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted PMI run of the default recipe (started here, in the background; `wait()` ends it)."""
    from hf_pmi.testing import letters_clip

    letters_clip("tiny")  # pre-train the recipe's backbone once, cached under HF_PMI_CACHE for every subprocess
    out = tmp_path_factory.mktemp("full") / "run"
    proc = start(out, PMI)

    def wait():
        if proc.returncode is None:
            code, log = finish(proc)
            assert code == 0, log[-3000:]
        return out

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigkill_during_training_inversion_and_saving_then_resume_gives_the_same_results(tmp_path, full_run):
    kills = {"training": "train_step:4",  # task 1, its 2nd step
             "task 3": "train_step:7",  # task 3, its 1st step
             "inversion": "inversion:1500",  # a module call between tasks 0 and 1 (statistics, bank, synthesis)
             "saving": "save:3"}  # task 2's weights written, its checkpoint not complete
    killed = {name: start(tmp_path / name, PMI, kill_at=spec) for name, spec in kills.items()}
    for name, proc in killed.items():
        code, log = finish(proc)
        assert code == -signal.SIGKILL, f"{name}: exit {code}\n{log[-3000:]}"
    assert done_tasks(tmp_path / "training") == ["task-0"]
    assert done_tasks(tmp_path / "task 3") == ["task-0", "task-1", "task-2"]
    assert 1 <= len(done_tasks(tmp_path / "inversion")) <= 4
    assert done_tasks(tmp_path / "saving") == ["task-0", "task-1"] and (tmp_path / "saving" / "task-2.tmp").is_dir()
    interrupted_wall = {name: results(tmp_path / name)["wall_seconds"] for name in kills}

    resumed = {name: start(tmp_path / name, [*PMI, "--resume_from_checkpoint", "true"]) for name in kills}
    full = full_run()
    expected = results(full)
    trainable = json.loads((full / "task-4" / "continual_state.json").read_text())["trainable_parameters"]
    # each class is inverted once, after its own task (2 classes a task), and kept in the checkpoint
    assert [log["inverted_classes"] for log in expected["method_logs"]] == [2] * 5
    for name, proc in resumed.items():
        code, log = finish(proc)
        assert code == 0, f"{name}: {log[-3000:]}"
        assert "crashed or was killed" in log and "[hf_pmi] Resuming from" in log  # the stale lock, the resume
        got = results(tmp_path / name)
        assert got["accuracy_matrix"] == expected["accuracy_matrix"], name
        # the resumed tasks inverted their own classes only: the earlier ones came from the checkpoint's buffer
        assert [log["inverted_classes"] for log in got["method_logs"]] == [2] * 5, name
        assert got["counts"] == expected["counts"] and got["a_last"] == expected["a_last"]
        assert got["wall_seconds"] > interrupted_wall[name]  # the clock went on from the checkpoint
        state = json.loads((tmp_path / name / "task-4" / "continual_state.json").read_text())
        assert state["trainable_parameters"] == trainable  # exactly what the recipe made trainable
        assert done_tasks(tmp_path / name) == [f"task-{t}" for t in range(5)]


def test_same_seed_gives_identical_results_with_lora(tmp_path, full_run):
    again = start(tmp_path / "again", PMI)  # the same command line as the uninterrupted run
    code, log = finish(again)
    assert code == 0, log[-3000:]
    first, second = full_run(), tmp_path / "again"
    assert results(first)["accuracy_matrix"] == results(second)["accuracy_matrix"]
    assert json.loads((second / "task-4" / "continual_clip.json").read_text())["lora"]["r"] == 16
    a, b = (load_file(run / "task-4" / "adapter" / "adapter_model.safetensors") for run in (first, second))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-identical LoRA weights


def test_resume_through_args_restores_exactly_the_trainable_set(tmp_path, digits, processor):
    """The issue's case: a recipe froze the text tower; after a crash and a resume it must stay frozen."""
    import torch
    from transformers import TrainerCallback

    from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
    from hf_pmi.testing import build_clip

    class Crash(TrainerCallback):
        def on_task_end(self, args, state, control, task_id, **kw):
            if task_id == 0:
                raise KeyboardInterrupt("simulated crash after task 0")

    def model():
        clip = build_clip("tiny")
        clip.text_model.requires_grad_(False)  # as clip_digits.py --lora_r 0 --text_training projection
        return ContinualCLIP.from_clip(clip)

    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    common = dict(output_dir=str(tmp_path / "out"), method="finetune", max_steps=2, per_device_train_batch_size=16, warmup_steps=0,
                  disable_tqdm=True, report_to="none", seed=0)
    with pytest.raises(KeyboardInterrupt):
        ContinualTrainer(model=model(), args=ContinualConfig(**common), tasks=tasks, processing_class=processor,
                         callbacks=[Crash()]).train()
    saved = ContinualCLIP.from_pretrained(tmp_path / "out" / "task-0")
    args = ContinualConfig(**common, resume_from_checkpoint=str(tmp_path / "out" / "task-0"))  # a path, as on a CLI
    trainer = ContinualTrainer(model=model(), args=args, tasks=tasks, processing_class=processor)
    trainer.train()  # no argument: args.resume_from_checkpoint is used
    text = dict(trainer.model.clip.text_model.named_parameters())
    assert not any(p.requires_grad for p in text.values())
    assert all(torch.equal(p, dict(saved.clip.text_model.named_parameters())[n]) for n, p in text.items())
    assert trainer.model.clip.text_projection.weight.requires_grad  # what was trainable still is
