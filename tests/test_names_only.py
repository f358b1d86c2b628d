"""New classes from their names only: the projection maths, the bank's raw Gaussians, the errors,
and names-only tasks end to end (a run, and a checkpoint served by the local Hub server)."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from configs import fast_pmi
from hub_server import hub_client, hub_server  # noqa: F401  (fixtures)
from peft import LoraConfig

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.bank import FeatureBank
from hf_pmi.integrity import weight_checksums, write_json
from hf_pmi.modeling import class_text_embeddings
from hf_pmi.names_only import (REFERENCE_PRESET, NamesOnlyConfig, boundary_target, make_names_only, names_only_tasks,
                               nearest_classes, project_name, rotate_toward)
from hf_pmi.routing import ClassRouter, routed_probs
from hf_pmi.testing import build_clip, build_tokenizer

FAST_PMI = fast_pmi()
FAST_NAMES = NamesOnlyConfig(per_class=4, neighbours=2)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----- maths ---------------------------------------------------------------------------------------
def test_rotation_maps_source_onto_target_and_is_orthogonal():
    a, b = unit(16, seed=1), unit(16, seed=2)
    assert torch.allclose(rotate_toward(a[None], a, b)[0], b, atol=1e-6)
    x = torch.randn(10, 16)
    r = rotate_toward(x, a, b)
    assert torch.allclose(r @ r.t(), x @ x.t(), atol=1e-4)  # lengths and angles kept
    # the part orthogonal to the plane of a and b is untouched
    q, _ = torch.linalg.qr(torch.stack([a, b], 1))
    perp = lambda y: y - (y @ q) @ q.t()  # noqa: E731
    assert torch.allclose(perp(r), perp(x), atol=1e-5)
    # the angle between a rotated vector and b equals that between the original and a
    assert torch.allclose(r @ b, x @ a, atol=1e-5)
    assert torch.equal(rotate_toward(x, a, a), x)


def test_projection_picks_text_neighbours_and_shifts_toward_the_prototype():
    old = torch.linalg.qr(torch.randn(8, 6, generator=torch.Generator().manual_seed(3)))[0].t()  # orthonormal rows
    new = F.normalize(old[4] + 0.3 * old[1], dim=-1)
    assert nearest_classes(old, new, 2).tolist() == [4, 1]
    means, stds = torch.randn(6, 8) * 3, torch.zeros(6, 8)
    # one neighbour, no spread, no shift: the neighbour's mean direction rotated from its prototype to the new one
    t = project_name(means, stds, old, new, neighbours=1, per_class=3, gamma=0.0)
    expected = rotate_toward(F.normalize(means[4], dim=-1)[None], old[4], new)[0]
    assert torch.allclose(t, expected.expand(3, -1), atol=1e-5)
    # gamma = 1 is the text prototype itself; every target has unit norm
    assert torch.allclose(project_name(means, stds + 1, old, new, gamma=1.0), new.expand(20, -1), atol=1e-6)
    t = project_name(means, stds + 1, old, new, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20, 8) and torch.allclose(t.norm(dim=-1), torch.ones(20), atol=1e-5)


def test_boundary_target_splits_old_and_new_by_the_raw_clip_and_old_by_the_previous_model():
    g = torch.Generator().manual_seed(0)
    raw, previous = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 4, generator=g) * 3
    p = boundary_target(raw, previous, n_old=4)
    raw_p, prev_p = F.softmax(raw, -1), F.softmax(previous, -1)
    assert torch.allclose(p.sum(1), torch.ones(6), atol=1e-6)
    assert torch.allclose(p[:, 4:], raw_p[:, 4:])  # new classes: the raw CLIP's probabilities
    assert torch.allclose(p[:, :4].sum(1), raw_p[:, :4].sum(1), atol=1e-6)  # old mass: the raw CLIP's
    assert torch.allclose(p[:, :4] / p[:, :4].sum(1, keepdim=True), prev_p, atol=1e-6)  # split: the previous model's


def test_routing_keeps_the_raw_clip_on_routed_classes_and_the_model_split_on_the_others():
    g = torch.Generator().manual_seed(1)
    raw, adapted = torch.randn(5, 6, generator=g) * 3, torch.randn(5, 6, generator=g) * 3
    routed = torch.tensor([False, True, False, False, True, False])
    p = routed_probs(raw, adapted, routed)
    raw_p = F.softmax(raw, -1)
    assert torch.allclose(p.sum(1), torch.ones(5), atol=1e-6)
    assert torch.equal(p[:, routed], raw_p[:, routed])
    kept = p[:, ~routed]
    assert torch.allclose(kept / kept.sum(1, keepdim=True), F.softmax(adapted[:, ~routed], -1), atol=1e-6)


def test_a_routed_model_scores_routed_classes_by_the_raw_clip_and_reloads_bit_exact(tmp_path):
    from hf_pmi.blocks import VisionBlocks

    torch.manual_seed(0)
    model = ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=4, lora_alpha=8),
                                    class_names=["zero", "one", "two"], tokenizer=build_tokenizer())
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (adapted == raw): make the two models differ
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixel_values=pixels).logits
        assert model(pixel_values=pixels).routed_logits is None  # nothing routed yet
        prototype = unit(1, model.clip_config.projection_dim, seed=5)
        model.route_classes([1], prototype)
        out = model(pixel_values=pixels)
        routed = out.routed_logits
    assert torch.equal(out.logits, plain) and torch.equal(out.prediction_logits, routed)  # logits keep one meaning
    with torch.no_grad():
        with model.clip.disable_adapter():
            raw = F.normalize(VisionBlocks(model.clip).features(pixels), dim=-1)
            text = class_text_embeddings(model.clip, model.prompt_ids, model.prompt_mask)
    text[1] = prototype[0]
    expected = routed_probs(model.logit_scale * raw @ text.t(), plain, torch.tensor([False, True, False]))
    assert torch.allclose(routed.exp(), expected, atol=1e-5)
    assert not torch.allclose(routed.exp(), F.softmax(plain, -1), atol=1e-3)  # routing changed the scores
    with torch.no_grad():
        train_out = model.train()(pixel_values=pixels)  # training sees the model alone
        assert torch.equal(train_out.logits, plain) and train_out.routed_logits is None
    model.eval().save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "router" / "router.safetensors").exists()
    loaded = ContinualCLIP.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.routed_classes == [1] and torch.equal(loaded.router.prototypes, model.router.prototypes)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).routed_logits, routed)
    with pytest.raises(ValueError, match=r"routes \[1\] already"):
        model.route_classes([1], prototype)
    with pytest.raises(ValueError, match="prototypes of shape"):
        model.route_classes([2], prototype[:, :3])
    with pytest.raises(ValueError, match="needs a LoRA model"):
        ContinualCLIP.from_clip(build_clip("tiny"), class_names=["a"], tokenizer=build_tokenizer()).route_classes(
            [0], prototype)
    router_json = tmp_path / "ckpt" / "router" / "router.json"
    meta = json.loads(router_json.read_text())
    meta["class_ids"] = [1, 2]  # a config that does not match its prototypes is refused, naming both files
    router_json.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"router\.json is corrupt"):  # the checkpoint's checksums see the edit
        ContinualCLIP.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="holds 1 prototypes"):  # and the router's own check, on its own
        ClassRouter.from_pretrained(tmp_path / "ckpt" / "router")


def test_reference_preset_gives_the_reference_training_and_explicit_values_win():
    ours, ref = NamesOnlyConfig(), NamesOnlyConfig(preset="reference")
    for name, value in REFERENCE_PRESET.items():
        assert getattr(ref, name) == value and getattr(ours, name) != value
    assert (ref.neighbours, ref.per_class, ref.gamma, ref.learning_rate) == (5, 20, 0.1, 5e-4)
    assert NamesOnlyConfig(preset="reference", boundary_kd=0.5).boundary_kd == 0.5
    with pytest.raises(ValueError, match="preset must be"):
        NamesOnlyConfig(preset="paper")


def test_bank_keeps_raw_gaussians_through_save_and_load(tmp_path):
    bank = FeatureBank()
    feats = {0: torch.randn(5, 4), 1: torch.randn(5, 4) + 2}
    bank.add_classes([0, 1], feats, train_contrastive=False)
    bank.add_raw_classes([0, 1], {c: f * 2 for c, f in feats.items()})
    bank.names_only_classes = [1]
    bank.save_pretrained(tmp_path)
    loaded = FeatureBank.from_pretrained(tmp_path)
    assert torch.equal(loaded.raw_means, bank.raw_means) and torch.equal(loaded.raw_stds, bank.raw_stds)
    assert loaded.num_raw_classes == 2 and loaded.names_only_classes == [1]
    assert torch.allclose(loaded.raw_means[1], (feats[1] * 2).mean(0))
    with pytest.raises(ValueError, match="next ids are \\[2\\]"):
        bank.add_raw_classes([3], {3: torch.randn(2, 4)})


# ----- runs ----------------------------------------------------------------------------------------
def lora_model():
    return ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=4, lora_alpha=8))


def args_for(tmp_path, name, method="pmi", **kw):
    base = dict(output_dir=str(tmp_path / name), method=method, max_steps=2, per_device_train_batch_size=16,
                warmup_steps=0, disable_tqdm=True, logging_steps=100)
    return ContinualConfig(**{**base, **kw})


def test_run_with_a_names_only_last_task(tmp_path, digits, processor):
    from safetensors.torch import load_file

    def run(name, route):
        tasks = make_names_only(split_class_incremental(digits, num_tasks=3, seed=0),
                                config=dataclasses.replace(FAST_NAMES, scoring="route" if route else "adapted"))
        torch.manual_seed(0)  # the LoRA weights are drawn before the Trainer seeds anything
        trainer = ContinualTrainer(model=lora_model(), args=args_for(tmp_path, name), tasks=tasks,
                                   processing_class=processor, method_config=FAST_PMI)
        return tasks, trainer, trainer.train()

    tasks, trainer, result = run("run", route=True)
    assert tasks[2].train is None and tasks[2].test is not None
    bank = trainer.method.bank
    n = len(tasks.class_names)
    assert bank.num_classes == n and bank.num_raw_classes == n and bank.names_only_classes == tasks[2].class_ids
    assert result.accuracy_matrix[2][2] is not None  # evaluated on real test images of the names-only classes
    assert trainer.args.learning_rate == args_for(tmp_path, "x").learning_rate  # the task's own lr was restored
    assert result.method_logs[2]["names_only_feature_mse"] >= 0
    assert trainer.accelerator.unwrap_model(trainer.model).routed_classes == tasks[2].class_ids
    card = (tmp_path / "run" / "task-2" / "README.md").read_text()
    assert f"{tasks[2].class_names[0]} (learned from its name only" in card
    assert "name only" not in (tmp_path / "run" / "task-1" / "README.md").read_text()
    # routing acts at inference only: without it the same run trains bit-identical weights
    _, unrouted, unrouted_result = run("unrouted", route=False)
    assert unrouted.accelerator.unwrap_model(unrouted.model).routed_classes == []
    a, b = (load_file(tmp_path / name / "task-2" / "adapter" / "adapter_model.safetensors")
            for name in ("run", "unrouted"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # on this tiny CLIP (random text tower) image and text features lie far apart, so only
    # `text_space_prototypes` keeps routing from pulling the old tasks' images to the new classes
    routed_row, unrouted_row = result.accuracy_matrix[2], unrouted_result.accuracy_matrix[2]
    assert all(abs(routed_row[j] - unrouted_row[j]) <= 0.05 for j in (0, 1)), (routed_row, unrouted_row)


def test_a_failing_names_only_task_leaves_the_trainer_as_it_was(tmp_path, digits, processor, monkeypatch):
    """The names-only task trains with its own lr, epochs and collator; they are restored on failure too."""
    from hf_pmi.names_only import NamesOnlyLearner

    tasks = make_names_only(split_class_incremental(digits, num_tasks=2, seed=0), config=FAST_NAMES)
    args = args_for(tmp_path, "fail")
    trainer = ContinualTrainer(model=lora_model(), args=args, tasks=tasks, processing_class=processor,
                               method_config=FAST_PMI)
    before = (trainer.args.learning_rate, trainer.args.num_train_epochs, trainer.args.warmup_steps, trainer.data_collator)
    seen = {}

    def failing_loss(self, model, inputs, config, *rest):
        seen["lr"], seen["collator"] = trainer.args.learning_rate, trainer.data_collator
        raise RuntimeError("boom inside the names-only task")

    monkeypatch.setattr(NamesOnlyLearner, "compute_loss", failing_loss)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert seen["lr"] == FAST_NAMES.learning_rate and seen["collator"] is not before[3]  # the task's own settings ran
    after = (trainer.args.learning_rate, trainer.args.num_train_epochs, trainer.args.warmup_steps, trainer.data_collator)
    assert after == before


def test_errors_before_any_work(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    with pytest.raises(ValueError, match="no class is known before it"):
        ContinualTrainer(model=lora_model(), args=args_for(tmp_path, "a"), tasks=make_names_only(tasks, [0]),
                         processing_class=processor)
    with pytest.raises(ValueError, match="method='pmi'"):
        ContinualTrainer(model=lora_model(), args=args_for(tmp_path, "b", method="finetune"),
                         tasks=make_names_only(tasks), processing_class=processor)
    for bad, match in (([""], "non-empty"), (["  "], "non-empty"), ([], "at least one"), ("five", "as a list"),
                       (["x", "x"], "more than once")):
        with pytest.raises(ValueError, match=match):
            names_only_tasks(bad)


@pytest.fixture
def checkpoint(tmp_path, digits, processor):
    """A 2-task pmi run on a LoRA-adapted tiny CLIP; returns (folder of task-1, its class names)."""
    tasks = split_class_incremental(digits, num_tasks=5, seed=0)
    old = dataclasses.replace(tasks, tasks=tasks.tasks[:2], class_order=tasks.class_order[:4],
                              class_names=tasks.class_names[:4])
    # the text head: names-only classes have no image statistics for a ranpac head (tests/test_heads.py)
    ContinualTrainer(model=lora_model(), args=args_for(tmp_path, "base", head="text"), tasks=old,
                     processing_class=processor, method_config=FAST_PMI).train()
    return tmp_path / "base" / "task-1", old.class_names


def test_continued_checkpoint_errors(tmp_path, checkpoint):
    folder, names = checkpoint
    # continuing a run's middle task (its rows are as long as the whole run) keeps a square matrix
    mid = ContinualTrainer.from_pretrained(str(folder.parent / "task-0"), tasks=["a new digit"],
                                           args=args_for(tmp_path, "mid"), method_config=FAST_PMI)
    assert [len(row) for row in mid.accuracy_matrix] == [2] and len(mid.counts) == 2
    with pytest.raises(ValueError, match="already exist"):
        ContinualTrainer.from_pretrained(str(folder), tasks=[names[0]], args=args_for(tmp_path, "c"))
    # a bank without raw-CLIP Gaussians (e.g. written before they existed) is refused, saying how to get one
    bank = FeatureBank.from_pretrained(folder / "feature_bank")
    bank._raw_means, bank._raw_stds, bank.raw_statistics = [], [], None
    bank.save_pretrained(folder / "feature_bank")
    state = json.loads((folder / "continual_state.json").read_text())
    state["checksums"] = weight_checksums(str(folder))  # an honest old bank, not a corrupt file
    write_json(str(folder / "continual_state.json"), state, seal=True)
    with pytest.raises(ValueError, match="record_raw_gaussians"):
        ContinualTrainer.from_pretrained(str(folder), tasks=["a new digit"], args=args_for(tmp_path, "d"),
                                         method_config=FAST_PMI)


def test_add_a_class_by_name_to_a_hub_checkpoint_and_evaluate_it(tmp_path, hub_client, checkpoint, digits):
    from huggingface_hub import HfApi

    folder, names = checkpoint
    repo = "tester/clip-digits-names"
    api = HfApi()
    api.create_repo(repo)
    api.create_branch(repo, branch="task-1")
    api.upload_folder(folder_path=str(folder), repo_id=repo, revision="task-1")
    new_name = next(n for n in digits["test"].features["label"].names if n not in names)
    tasks = names_only_tasks([new_name], test=digits["test"], config=FAST_NAMES)
    trainer = ContinualTrainer.from_pretrained(repo, tasks=tasks, args=args_for(tmp_path, "cont"), revision="task-1",
                                               method_config=FAST_PMI)
    result = trainer.train()
    assert trainer.model.class_names == names + [new_name]
    accuracy = result.accuracy_matrix[2][2]
    assert accuracy is not None and 0.0 <= accuracy <= 1.0 and result.counts[2] > 0
    state = json.loads((tmp_path / "cont" / "task-2" / "continual_state.json").read_text())
    assert state["seen_classes"][-1] == new_name
    card = (tmp_path / "cont" / "task-2" / "README.md").read_text()
    assert f"{new_name} (learned from its name only, no image; scored by the pre-trained CLIP)" in card
    assert f"It does not route {new_name} to the pre-trained CLIP" in card  # the plain clip/ folder's caveat
    assert f"| names_only.per_class | {FAST_NAMES.per_class} |" in card  # the names-only settings that made it
    bank = FeatureBank.from_pretrained(tmp_path / "cont" / "task-2" / "feature_bank")
    assert bank.names_only_classes == [4] and bank.num_raw_classes == 5
    # the new class is routed to the raw CLIP, and the reloaded checkpoint scores as the trainer did
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = ContinualCLIP.from_pretrained(tmp_path / "cont" / "task-2").eval()
    assert model.routed_classes == loaded.routed_classes == [4]
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=pixels).routed_logits, model(pixel_values=pixels).routed_logits,
                              atol=1e-5)


def test_recipe_runs_and_adds_classes_by_name_to_its_checkpoint(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fast = ["--max_steps", "2", "--per_device_train_batch_size", "16", "--replay_batch_size", "8", "--disable_tqdm",
            "true", "--inversion_layer_steps", "2", "--inversion_first_block_steps", "4", "--inversion_upsample_at", "1", "2", "3",
            "--inversion_refine_steps", "2", "--sampling_per_class", "2", "--names_only_per_class", "3", "--replay_grid_samples", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}

    def run(*args):
        proc = subprocess.run([sys.executable, "recipes/clip_shapes.py", *args, *fast], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # a tiny pre-training (3 steps): this checks the plumbing, not the accuracy
    run("--output_dir", str(tmp_path / "run"), "--num_tasks", "2", "--pretrain_steps", "3", "--backbone_dir",
        str(tmp_path / "cache"), "--test_images_per_class", "2", "--images_per_class", "8")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["accuracy_matrix"][1][1] is not None
    run("--output_dir", str(tmp_path / "more"), "--from_checkpoint", str(tmp_path / "run" / "task-1"),
        "--add_names", "red circle")
    state = json.loads((tmp_path / "more" / "task-2" / "continual_state.json").read_text())
    assert state["seen_classes"][-1] == "red circle"
    assert "red circle (learned from its name only" in (tmp_path / "more" / "task-2" / "README.md").read_text()


def test_shapes_recipe_is_reproducible_with_lora(tmp_path):
    """The same command twice gives bit-identical LoRA weights: they are drawn after the seed is set
    (before the fix, the shapes recipe drew them from an unseeded generator)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    for name in ("a", "b"):
        cmd = [sys.executable, "recipes/clip_shapes.py", "--output_dir", str(tmp_path / name), "--num_tasks", "2",
               "--names_only_last", "0", "--pretrain_steps", "3", "--backbone_dir", str(tmp_path / "cache"),
               "--images_per_class", "8", "--test_images_per_class", "2", "--max_steps", "2",
               "--per_device_train_batch_size", "16", "--replay_batch_size", "8", "--disable_tqdm", "true",
               "--inversion_layer_steps", "2", "--inversion_first_block_steps", "4", "--inversion_upsample_at", "1", "2", "3", "--inversion_refine_steps", "2",
               "--sampling_per_class", "2", "--replay_grid_samples", "0", "--report_to", "none"]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = (load_file(tmp_path / n / "task-1" / "adapter" / "adapter_model.safetensors") for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_product_scoring_multiplies_the_two_models_and_the_router_keeps_it(tmp_path):
    """scoring="product": every class gets the raw CLIP's probability times the adapted model's, renormalised
    (a softer old/new split than routing); the router saves its combination (a version-1 file routes)."""
    from hf_pmi.blocks import VisionBlocks
    from hf_pmi.names_only.learner import route_names
    from hf_pmi.routing import ClassRouter, product_probs

    torch.manual_seed(0)
    model = ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=4, lora_alpha=8),
                                    class_names=["zero", "one", "two"], tokenizer=build_tokenizer())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    pixels = torch.randn(4, 3, 32, 32)
    prototype = unit(1, model.clip_config.projection_dim, seed=5)
    route_names(model, [2], prototype, "product")
    with torch.no_grad():
        out = model(pixel_values=pixels)
        with model.clip.disable_adapter():
            raw = F.normalize(VisionBlocks(model.clip).features(pixels), dim=-1)
            text = class_text_embeddings(model.clip, model.prompt_ids, model.prompt_mask)
    text[2] = prototype[0]
    expected = product_probs(model.logit_scale * raw @ text.t(), out.logits)
    assert torch.allclose(out.routed_logits.exp(), expected, atol=1e-5)
    routed = routed_probs(model.logit_scale * raw @ text.t(), out.logits, torch.tensor([False, False, True]))
    assert not torch.allclose(expected, routed, atol=1e-3)  # not the hard split
    with pytest.raises(ValueError, match="cannot also use 'route'"):
        route_names(model, [1], prototype, "route")
    route_names(model, [1], prototype, "adapted")  # the trained model alone: nothing routed
    assert model.routed_classes == [2]
    model.router.save_pretrained(tmp_path / "router")
    meta = json.loads((tmp_path / "router" / "router.json").read_text())
    assert meta["combine"] == "product" and meta["version"] == 2
    assert ClassRouter.from_pretrained(tmp_path / "router").combine == "product"
    del meta["combine"]
    meta["version"] = 1
    (tmp_path / "router" / "router.json").write_text(json.dumps(meta))
    assert ClassRouter.from_pretrained(tmp_path / "router").combine == "route"


def test_reference_training_changes_the_adapter_and_the_benchmark_sees_it(tmp_path, checkpoint):
    """The held-out rows that once read identical to zero-shot came from unchanged predictions, not from
    unchanged weights: the reference's names-only training moves the adapter (the benchmark reports both)."""
    import os
    import sys

    from safetensors.torch import load_file

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from names_only import adapter_change, protocol_tasks

    folder, _ = checkpoint
    config = NamesOnlyConfig(preset="reference", per_class=4, neighbours=2)
    ContinualTrainer.from_pretrained(str(folder), tasks=names_only_tasks(
        ["a new digit", "another new digit"], config=config),  # two: a CE over one new class has no gradient
                                     args=args_for(tmp_path, "ref"), method_config=FAST_PMI).train()
    before = load_file(folder / "adapter" / "adapter_model.safetensors")
    after = load_file(tmp_path / "ref" / "task-2" / "adapter" / "adapter_model.safetensors")
    assert adapter_change(before, before) == 0.0 and adapter_change(before, after) > 0
    # the harder held-out protocol: 48 pairs seen in pre-training first, then 12 never-seen ones
    from hf_pmi.testing.shapes import HELD_OUT, SEEN

    tasks = protocol_tasks("held_out", seed=0, per_class=1, test_per_class=1)
    assert [len(t.class_ids) for t in tasks] == [12] * 5
    assert set(tasks.class_names[:48]) == set(SEEN) and set(tasks.class_names[48:]) <= set(HELD_OUT)
