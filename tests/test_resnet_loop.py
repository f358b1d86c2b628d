"""The BatchNorm family's phases run inside `transformers.Trainer`'s loop (issue 30, part 2): the same numbers
as the hand-written loop it replaced, and what Trainer adds (trackers, progress, accumulation, clipping,
several processes)."""

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from resnet_loop_runs import FIXTURE, RUNS, fonts_tasks, run, small_config, small_model, weights_digest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_thread():
    """The fixture was recorded with one torch thread (a CPU convolution's sums depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def arguments(tmp_path, **kwargs):
    from transformers import TrainingArguments

    values = dict(output_dir=str(tmp_path / "trainer"), max_grad_norm=0.0, report_to="none", disable_tqdm=True,
                  use_cpu=True, logging_strategy="no")
    return TrainingArguments(**{**values, **kwargs})


@pytest.mark.parametrize("method,schedule", RUNS)
def test_trainer_loop_is_bit_equal_to_the_hand_written_loop(method, schedule, one_thread):
    """Same seed, one process, no accumulation, no clipping: the same accuracy matrix, the same first and last loss
    of every task and bit-equal weights as the SGD loop before issue 30 (tests/fixtures/resnet_loop_reference.json)."""
    expected = json.load(open(FIXTURE))["runs"][f"{method}/{schedule}"]
    got = run(method, schedule)
    assert got["accuracy_matrix"] == expected["accuracy_matrix"]
    assert got["losses"] == expected["losses"]
    assert got["weights"] == expected["weights"]


def test_accumulation_and_clipping_change_the_run(tmp_path, one_thread):
    """gradient_accumulation_steps and max_grad_norm reach the BN loop (both were refused before)."""
    from hf_pmi.resnet.continual import learn_tasks

    def weights(**kwargs):
        model = small_model()
        learn_tasks(model, fonts_tasks(num_tasks=2), small_config("finetune"), args=arguments(tmp_path, **kwargs))
        return weights_digest(model)

    plain = weights()
    assert weights(gradient_accumulation_steps=2) != plain
    assert weights(max_grad_norm=1e-3) != plain
    assert weights(max_grad_norm=1e6) == plain  # a bound no gradient reaches leaves every step as it was


def test_bn_run_reports_step_losses_progress_and_clipped_norms(tmp_path, capfd):
    """Through ContinualTrainer: step losses reach the callbacks at every logging step with a step that keeps
    growing across phases and tasks (a tracker's view), a progress bar shows, and the clipped gradient norm is logged."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    from hf_pmi import ContinualConfig, ContinualTrainer, split_class_incremental
    from hf_pmi.resnet.continual import ResNetContinualConfig
    from test_resnet_trainer import colours, tiny_resnet

    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    args = ContinualConfig(output_dir=str(tmp_path / "run"), method="finetune", logging_steps=1, disable_tqdm=False,
                           report_to="none", max_grad_norm=0.5)
    tasks = split_class_incremental(colours(["red", "green", "blue", "yellow"]), num_tasks=2, seed=None)
    trainer = ContinualTrainer(model=tiny_resnet(), args=args, tasks=tasks, processing_class=None,
                               method_config=ResNetContinualConfig(epochs=2, later_epochs=3, batch_size=8),
                               callbacks=[recorder])
    assert any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    steps = [log for log in recorder.logs if "loss" in log]
    assert len(steps) >= 4 and all(log["grad_norm"] > 0 for log in steps)
    assert any(log["grad_norm"] > 0.5 for log in steps)  # the pre-clip norm: clipping had work to do
    assert any("eval_a_last" in log for log in recorder.logs)  # the task metrics reach the same callbacks
    assert "100%|" in capfd.readouterr().err  # tqdm's bar of a finished phase


def test_tracker_sees_one_run_with_growing_steps(tmp_path):
    pytest.importorskip("tensorboard")
    import glob

    from hf_pmi.resnet.continual import learn_tasks
    from test_tracking import read_scalars

    learn_tasks(small_model(), fonts_tasks(num_tasks=2), small_config("finetune"),
                args=arguments(tmp_path, logging_strategy="steps", logging_steps=1, report_to=["tensorboard"]))
    files = glob.glob(str(tmp_path / "trainer" / "runs" / "*" / "events.out.tfevents.*"))
    assert len(files) == 1, files
    steps = [step for step, tag, _ in read_scalars(files[0]) if tag == "train/loss"]
    # task 0: 3 epochs x 3 batches; task 1: three stages of 1 epoch x 3 batches; one step each, steps go on
    assert steps == list(range(1, 19)), steps


def launch(out, method, batch_size, processes):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *(["--multi_gpu"] if processes > 1 else []), "--num_processes", str(processes),
           "tests/resnet_loop_runs.py", "--distributed", str(out), method, str(batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.load(open(f"{out}.json"))


@pytest.mark.parametrize("method", ["finetune", "pmi"])
def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path, method):
    """Two real CPU processes (gloo) with 4 images each per step against one process with 8: each global step
    sees the same 8 images (process k takes every other chunk of 4 of the same permutation) and DDP averages
    the two halves' gradients. What differs is BatchNorm: each process normalises by the moments of its own 4
    images (no SyncBatchNorm). So the runs differ slightly: the 2-process weights end within 25 % of the distance
    training moved the 1-process weights (measured ~10 %; one process with batch 4 instead ends ~290 % away)."""
    from safetensors.torch import load_file

    two = launch(tmp_path / "two", method, 4, 2)
    one = launch(tmp_path / "one", method, 8, 1)
    assert two["processes"] == 2 and one["processes"] == 1
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    init = small_model().state_dict()
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]

    def start(k):  # the head grew from no rows: its rows start where grow_classifier put them, measured from 0
        return init[k] if init[k].shape == a[k].shape else torch.zeros_like(a[k])

    gap = sum(((a[k] - b[k]) ** 2).sum() for k in keys).sqrt()
    moved = sum(((a[k] - start(k)) ** 2).sum() for k in keys).sqrt()
    assert gap < 0.25 * moved, (float(gap), float(moved))
    assert len(two["accuracy_matrix"]) == len(one["accuracy_matrix"]) == 3


def test_bf16_mixed_precision_trains_in_bfloat16_with_the_replay_losses(tmp_path):
    """Trainer's ``bf16`` reaches the BN loop (on the CPU here): the network runs in bfloat16 inside every phase,
    the replay losses that reuse its pooled features with the head work (they failed on mixed dtypes before), the
    weights stay float32 and the run learns as the float32 run does."""
    from test_resnet_continual import colour_tasks, config, tiny_model

    from hf_pmi.resnet.continual import learn_tasks

    matrices = {}
    for bf16 in (False, True):
        model = tiny_model()
        dtypes = set()
        model.resnet.stem.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if torch.is_grad_enabled() else None)
        matrices[bf16] = learn_tasks(model, colour_tasks(), config("exemplar_replay", stage_epochs=(2, 2, 4)),
                                     args=arguments(tmp_path, bf16=bf16))["accuracy_matrix"]
        assert dtypes == {torch.bfloat16 if bf16 else torch.float32}
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert matrices[True][0][0] > 0.75  # chance: 0.5
    for row, row32 in zip(matrices[True], matrices[False]):
        assert all(abs(a - b) <= 0.25 for a, b in zip(row, row32) if a is not None)
