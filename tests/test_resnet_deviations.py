"""The flags of the remaining deviations from the reference's ResNet path (issue 30; docs/resnet.md, "Remaining
deviations"): each reading does what it says, and hf_pmi's default stays as it was."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_resnet_continual import colour_tasks, config, tiny_model  # noqa: E402

from hf_pmi.resnet.continual import ResNetContinualConfig, black_fill, learn_tasks  # noqa: E402


def test_the_product_form_is_the_references_loss_and_changes_the_run(monkeypatch):
    from hf_pmi.resnet import learner
    from hf_pmi.resnet.losses import total_loss

    terms = {k: torch.tensor(v) for k, v in (("ce", 0.5), ("hkd", 0.2), ("rkd", 3.0), ("ft", 2.0))}
    assert float(total_loss(terms, "product")) == pytest.approx(0.5 + 0.2 + 3.0 * 2.0)
    head_stage = {k: terms[k] for k in ("ce", "hkd", "ft")}  # no relation KD in the new-rows stage
    assert float(total_loss(head_stage, "product")) == pytest.approx(0.5 + 0.2 * 2.0)
    seen = []
    monkeypatch.setattr(learner, "total_loss", lambda t, form: seen.append((sorted(t), form)) or total_loss(t, form))
    weights = {}
    for form in ("sum", "product"):
        model = tiny_model()
        learn_tasks(model, colour_tasks(), config("exemplar_replay", loss_form=form, stage_epochs=(1, 1, 1)))
        weights[form] = model.classifier.weight.detach().clone()
    assert {form for _, form in seen} == {"sum", "product"}
    assert (["ce", "ft", "hkd"], "product") in seen and (["ce", "ft", "hkd", "rkd"], "product") in seen
    assert not torch.equal(weights["sum"], weights["product"])


def test_random_target_classes_draw_each_targets_class_and_size_cfs_batches_by_count(monkeypatch):
    from hf_pmi.bank import FeatureBank
    from hf_pmi.resnet.inversion import replay_targets

    bank = FeatureBank(covariance="diag")
    g = torch.Generator().manual_seed(0)
    bank.add_classes([0, 1, 2], {c: torch.randn(30, 4, generator=g) + 3 * c for c in range(3)})
    batches = []
    original = bank.sample
    monkeypatch.setattr(bank, "sample", lambda ids, n, gen, sel, **kw: batches.append((ids[0], n, kw.get("batch")))
                        or original(ids, n, gen, sel, **kw))
    _, equal = replay_targets(bank, [0, 1, 2], 40, torch.Generator().manual_seed(1), cfs_step=10)
    assert equal.bincount().tolist() == [40, 40, 40] and [b for _, _, b in batches] == [4, 4, 4]
    batches.clear()
    feats, labels = replay_targets(bank, [0, 1, 2], 40, torch.Generator().manual_seed(1), target_classes="random",
                                   cfs_step=10)
    counts = labels.bincount().tolist()
    assert sum(counts) == 120 and counts != [40, 40, 40] and min(counts) > 20  # uniform draws: 40 +- ~7
    assert [(c, n, b) for c, n, b in batches] == [(c, counts[c], max(counts[c] // 10, 2)) for c in range(3)]
    assert (feats[labels == 2].mean(0) - 6).abs().max() < 1.5  # each target from its own class's Gaussian
    again = replay_targets(bank, [0, 1, 2], 40, torch.Generator().manual_seed(1), target_classes="random", cfs_step=10)
    assert torch.equal(again[1], labels)  # seeded


def test_black_padding_pads_the_normalised_value_of_black_and_keeps_the_image():
    from hf_pmi.resnet.training import augment

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    fill = black_fill(mean, std)
    black = (torch.zeros(1, 3, 1, 1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(black.flatten(), torch.tensor(fill))
    x = torch.rand(64, 3, 6, 6) + 10  # far from any padding value
    out = augment(x, 2, False, torch.Generator().manual_seed(0), fill)
    for c in range(3):
        pad = out[:, c][out[:, c] < 5]
        assert len(pad) and torch.all(pad == fill[c])
    assert any(torch.equal(o, x[i]) for i, o in enumerate(out))  # an uncropped image stays bit for bit


def test_the_last_stage_reading_trains_every_block_of_the_last_stage():
    from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    from hf_pmi.resnet.training import later_task_phases, restore_flags, set_phase_modes

    model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=3, base_width=4, num_labels=2))
    for reading, prefixes in (("block", ("resnet.stages.2.2.",)), ("stage", ("resnet.stages.2.",))):
        phase = later_task_phases(model, "staged", (1, 1, 1), (0.1, 0.05, 5e-3), 0.1, reading)[1]
        flags = set_phase_modes(model, phase)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, _ in model.named_parameters() if n.startswith((*prefixes, "classifier"))}
        restore_flags(flags)


def test_running_counts_keep_counting_during_the_head_fine_tuning():
    from hf_pmi.resnet import learner

    counts = {}
    for reading in ("fixed", "running"):
        original = learner.Learner.train_task

        def spy(self, task, teacher, n_old):
            out = original(self, task, teacher, n_old)
            counts.setdefault(reading, []).append(self.class_counts.clone())
            return out

        learner.Learner.train_task = spy
        try:
            learn_tasks(tiny_model(), colour_tasks(), config("exemplar_replay", stage_epochs=(1, 1, 1), head_epochs=2,
                                                             head_counts=reading))
        finally:
            learner.Learner.train_task = original
    # task 1: 3 epochs x (24 real + 24 replayed labels) before the fine-tuning, 2 more epochs of 48 with running
    assert counts["fixed"][1].sum().item() == 4 + 144
    assert counts["running"][1].sum().item() == 4 + 144 + 96


def test_a_misspelt_reading_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"loss_form must be one of \('sum', 'product'\)"):
        ResNetContinualConfig(loss_form="products")
    with pytest.raises(ValueError, match="target_classes"):
        ResNetContinualConfig(target_classes="uniform")


def test_a_folder_written_before_the_flags_resumes_and_a_changed_reading_is_refused(tmp_path):
    from hf_pmi.checkpoint import STATE_NAME, read_state, write_json
    from hf_pmi.resnet.continual import ADDED_SETTINGS

    tasks = colour_tasks()
    cfg = config("finetune")
    first = learn_tasks(tiny_model(), tasks, cfg, output_dir=str(tmp_path))
    for t in range(2):  # as an older version wrote them: no deviation flags in the recorded settings
        folder = tmp_path / f"task-{t}"
        state = read_state(str(folder))
        state["settings"]["config"] = {k: v for k, v in state["settings"]["config"].items() if k not in ADDED_SETTINGS}
        write_json(str(folder / STATE_NAME), state)
    again = learn_tasks(tiny_model(), tasks, cfg, output_dir=str(tmp_path))  # nothing left to train: it resumes
    assert again["accuracy_matrix"] == first["accuracy_matrix"]
    with pytest.raises(ValueError, match=r"other settings \['loss_form'\]"):
        learn_tasks(tiny_model(), tasks, config("finetune", loss_form="product"), output_dir=str(tmp_path))
