"""The BN family's class-incremental loop (`hf_pmi.resnet.continual`) on a tiny ResNet and generated images."""

import pytest
import torch
from torch import nn

from hf_pmi.resnet import (
    BNInversionConfig,
    ResNet32Config,
    ResNet32ForImageClassification,
)
from hf_pmi.resnet.continual import ResNetContinualConfig, TensorTask, learn_tasks

SIZE = 8


def colour_tasks(num_tasks=2, per_task=2, n=24, seed=0):
    """Class c: images of one colour (its own RGB offsets) plus noise; easy to learn, easy to forget."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randn(num_tasks * per_task, 3, generator=g) * 1.5
    tasks = []
    for t in range(num_tasks):
        ids = list(range(t * per_task, (t + 1) * per_task))
        y = torch.tensor(ids).repeat(n // per_task)
        x = colours[y].view(-1, 3, 1, 1) + 0.3 * torch.randn(len(y), 3, SIZE, SIZE, generator=g)
        yt = torch.tensor(ids).repeat(8)
        xt = colours[yt].view(-1, 3, 1, 1) + 0.3 * torch.randn(len(yt), 3, SIZE, SIZE, generator=g)
        tasks.append(TensorTask(ids, x, y, xt, yt))
    return tasks


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=0, image_size=SIZE))


def config(method, **kw):
    tiny_inversion = BNInversionConfig(layer_steps=2, refine_steps=3, warmup=1)
    base = {"method": method, "epochs": 8, "later_epochs": 6, "head_epochs": 1, "batch_size": 8, "replay_per_class": 4,
            "shift": 0, "inversion": tiny_inversion, "progress": False}
    return ResNetContinualConfig(**{**base, **kw})


def test_each_class_is_inverted_once_and_replayed_without_regeneration():
    result = learn_tasks(tiny_model(), colour_tasks(num_tasks=3), config("pmi", regenerate=False))
    # classes of tasks 0 and 1 inverted once each, after their task; the last task's never (nothing follows it)
    assert result["inverted_classes"] == {0: 1, 1: 1, 2: 1, 3: 1}
    assert result["inversion_passes"] > 0 and result["inversion_seconds"] > 0
    matrix = result["accuracy_matrix"]
    assert [sum(a is not None for a in row) for row in matrix] == [1, 2, 3]
    assert matrix[0][0] > 0.9  # the first task is learned (chance 0.5)


def test_full_inversion_spends_the_same_passes_as_pmi():
    tasks = colour_tasks()
    pmi = learn_tasks(tiny_model(), tasks, config("pmi"))
    full = learn_tasks(tiny_model(), tasks, config("full_inversion"))
    assert full["inversion_passes"] == pytest.approx(pmi["inversion_passes"], rel=0.05)


def test_replaying_real_samples_keeps_old_classes_that_finetuning_forgets():
    tasks = colour_tasks()
    # one-cycle over every parameter (old rows included): plain fine-tuning overwrites the old classes
    finetune = learn_tasks(tiny_model(), tasks, config("finetune", schedule="one_cycle"))
    exemplar = learn_tasks(tiny_model(), tasks, config("exemplar_replay"))
    assert finetune["accuracy_matrix"][1][0] < 0.2  # CE on the new classes only: the old ones are overwritten
    assert exemplar["accuracy_matrix"][1][0] > 0.6
    assert exemplar["inverted_classes"] == {}


def test_lwf_loss_drops_within_a_task():
    result = learn_tasks(tiny_model(), colour_tasks(), config("lwf", schedule="one_cycle"))
    assert all(step["last_loss"] < step["first_loss"] for step in result["losses"])


def test_bad_inputs_are_refused_before_any_work():
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        ResNetContinualConfig(method="nope")

    class NoBN(nn.Module):
        main_input_name = "pixel_values"

        def __init__(self):
            super().__init__()
            self.config = ResNet32Config(num_labels=0)
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Linear(4, 0)

    with pytest.raises(ValueError, match="BatchNorm"):
        learn_tasks(NoBN(), colour_tasks(), config("pmi"))
    tasks = colour_tasks()
    tasks[1].class_ids = [5, 6]
    with pytest.raises(ValueError, match=r"Task 1 has classes \[5, 6\]; they must be 2, 3"):
        learn_tasks(tiny_model(), tasks, config("finetune"))
    tasks = colour_tasks()
    tasks[0].y_test = tasks[0].y_test + 2
    with pytest.raises(ValueError, match="test labels hold classes"):
        learn_tasks(tiny_model(), tasks, config("finetune"))


def test_a_transformers_resnet_learns_with_pmi_in_the_same_loop():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      num_labels=0, downsample_in_first_stage=False))
    result = learn_tasks(model, colour_tasks(), config("pmi"))
    assert model.config.num_labels == 4 and model.classifier[-1].out_features == 4
    assert result["inverted_classes"] == {0: 1, 1: 1}
    assert result["accuracy_matrix"][0][0] > 0.9  # chance 0.5


def test_models_that_cannot_take_part_are_refused_naming_the_fix():
    from transformers import BertConfig, BertForSequenceClassification

    text = BertForSequenceClassification(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=1, intermediate_size=8))
    with pytest.raises(TypeError, match="takes 'input_ids', not images.*AutoModelForImageClassification"):
        learn_tasks(text, colour_tasks(), config("pmi"))
    model = tiny_model()
    model.classifier = nn.Sequential(nn.Linear(16, 4), nn.ReLU())
    with pytest.raises(TypeError, match="no classifier head that can grow.*give your model such a head"):
        learn_tasks(model, colour_tasks(), config("finetune"))


def test_a_transformers_resnet_with_classes_of_its_own_continues_after_them():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      num_labels=2, downsample_in_first_stage=False))
    tasks = colour_tasks()[1:]  # classes 2, 3: after the model's own 0, 1
    learn_tasks(model, tasks, config("finetune", epochs=1))
    assert model.classifier[-1].out_features == 4
    with pytest.raises(ValueError, match=r"Task 0 has classes \[0, 1\]; they must be 4, 5"):
        learn_tasks(model, colour_tasks()[:1], config("finetune", epochs=1))


# ----- issue 30: the reference's schedule, pool and selection -----------------------------------------------


def test_the_staged_schedule_never_moves_old_classifier_rows_in_the_main_stages():
    snapshots = {}

    def events(name, task, info):
        if name == "on_task_end":
            snapshots[task] = model.classifier.weight.detach().clone()

    for schedule, same in (("staged", True), ("one_cycle", False)):
        model = tiny_model()
        learn_tasks(model, colour_tasks(num_tasks=3), config("exemplar_replay", schedule=schedule, head_epochs=0),
                    events=events)
        # without the head fine-tuning, rows of earlier classes are bit for bit those the task that added them left
        assert torch.equal(snapshots[2][:2], snapshots[0][:2]) is same
        assert torch.equal(snapshots[2][2:4], snapshots[1][2:4]) is same
    assert not torch.equal(snapshots[1][:2], snapshots[0][:2])  # one_cycle moves them: the check can fail


def test_stages_train_what_the_reference_trains():
    from hf_pmi.resnet.training import later_task_phases, set_phase_modes, stage_epochs, training_groups

    model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=2, base_width=4, num_labels=2))
    groups = training_groups(model)
    assert [len(g) for g in groups] == [1, 1, 2, 3]  # last block; rest of stage 3; stage 2; stage 1 + stem
    assert groups[0][0] is model.resnet.stages[2][1] and groups[-1][0] is model.resnet.stem
    phases = later_task_phases(model, "staged", stage_epochs(160), (0.1, 0.05, 5e-3), 0.1)
    assert [(p.epochs, p.lr) for p in phases] == [(20, 0.1), (20, 0.05), (120, 5e-3)]
    flags = set_phase_modes(model, phases[1])  # + the last block: it alone trains (and is in train mode)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("resnet.stages.2.1.", "classifier"))}
    assert model.resnet.stages[2][1].training and not model.resnet.stages[2][0].training
    set_phase_modes(model, phases[0])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight"}
    assert not model.resnet.training
    for p, flag in flags:
        p.requires_grad_(flag)


def test_real_and_replayed_samples_take_separate_batchnorm_passes(monkeypatch):
    from hf_pmi.resnet import learner

    sizes = []
    original = learner.forward

    def counting(model, x, head=None):
        if model.training or any(m.training for m in model.modules()):
            sizes.append(x.shape[0])
        return original(model, x, head)

    monkeypatch.setattr(learner, "forward", counting)
    learn_tasks(tiny_model(), colour_tasks(), config("exemplar_replay", batch_size=8, head_epochs=0))
    assert sizes and max(sizes) == 8  # never 16: a real batch of 8 and its 8 replayed samples, each alone


def test_head_weights_come_from_the_labels_seen_and_rkd_is_new_every_task(monkeypatch):
    from hf_pmi.resnet import learner
    from hf_pmi.resnet.losses import RelationKD

    built, counts = [], []
    monkeypatch.setattr(learner, "RelationKD", lambda *a: built.append(RelationKD(*a)) or built[-1])
    original = learner.Learner._head_loss

    def spy(self, model, x, y, n_old, weights, w_hkd):
        if not counts or not torch.equal(counts[-1], self.class_counts):  # once per task's head fine-tuning
            counts.append(self.class_counts.clone())
        return original(self, model, x, y, n_old, weights, w_hkd)

    monkeypatch.setattr(learner.Learner, "_head_loss", spy)
    learn_tasks(tiny_model(), colour_tasks(num_tasks=3), config("exemplar_replay", stage_epochs=(1, 1, 1)))
    assert len(built) == 2 and built[0] is not built[1]  # tasks 1 and 2 each build their projections
    # from ones, + every label of 3 epochs x (24 real + 24 replayed) = 144 labels; old classes ~ as often as new
    assert counts[0].sum().item() == 4 + 144
    assert counts[0][:2].sum() == 2 + 72 and counts[0][2:].sum() == 2 + 72


def test_per_image_crop_and_flip():
    from hf_pmi.resnet.training import augment

    x = torch.arange(2 * 8 * 8, dtype=torch.float).view(2, 1, 8, 8).repeat(16, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, 0, False, g), x)
    out = augment(x, 2, True, g)
    assert out.shape == x.shape
    assert len({tuple(o[0].flatten().tolist()) for o in out[::2]}) > 3  # images of one kind differ: per-image crops
    assert (out == 0).any()  # zero padding shows


def test_the_reference_buffer_budget_and_cfs_targets():
    from hf_pmi.resnet.learner import Learner

    learner = Learner(tiny_model(), config("pmi", init_samples=6000, per_task_samples=5000))
    assert learner.per_class(1, 20) == 550  # CIFAR-100 5 tasks at task 1: (6000 + 5000) / 20 classes
    assert Learner(tiny_model(), config("pmi")).per_class(3, 8) == 4  # replay_per_class otherwise
    with pytest.raises(ValueError, match="init_samples and per_task_samples go together"):
        config("pmi", init_samples=100)
    g = torch.Generator().manual_seed(0)
    feats = {0: torch.randn(60, 16, generator=g) * 2, 1: torch.randn(60, 16, generator=g) + 3}
    draws = {}
    for selection in ("cfs", "gaussian"):
        learner = Learner(tiny_model(), config("pmi", selection=selection))
        learner.bank.add_classes([0, 1], feats, train_contrastive=selection == "cfs", contrastive_epochs=5)
        draws[selection], labels = learner._targets([0, 1], 80)
        assert labels.bincount().tolist() == [80, 80]
    assert not torch.allclose(draws["cfs"], draws["gaussian"])  # the same draws, selected differently


def test_regeneration_refits_old_gaussians_on_the_pool_through_the_new_model(monkeypatch):
    from hf_pmi.resnet import learner

    banks = []
    original = learner.Learner.add_to_pool

    def spy(self, task, tasks_done):
        original(self, task, tasks_done)
        banks.append((self.bank.means.clone(), self.bank.stds.clone()))

    monkeypatch.setattr(learner.Learner, "add_to_pool", spy)
    result = learn_tasks(tiny_model(), colour_tasks(num_tasks=3), config("pmi"))
    assert result["inverted_classes"] == {0: 2, 1: 2, 2: 1, 3: 1}  # every seen class anew after each task
    (m0, s0), (m1, s1) = banks
    assert m1.shape[0] == 4 and not torch.allclose(m1[:2], m0[:2])  # re-fitted, not kept
    assert not torch.allclose(s1[:2], s0[:2])


def test_recorded_input_prior_works_after_the_first_task_and_is_refused_where_it_serves_nothing():
    inversion = BNInversionConfig(layer_steps=2, refine_steps=3, warmup=1, input_prior="recorded")
    result = learn_tasks(tiny_model(), colour_tasks(num_tasks=3), config("pmi", inversion=inversion))
    assert result["inverted_classes"][0] == 2
    with pytest.raises(ValueError, match="input_prior='recorded' only serves"):
        config("lwf", inversion=inversion)
