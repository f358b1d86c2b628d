"""Each reference behaviour hf_pmi can be set to (issue #21), checked against its definition, and the
presets that set them all (`ReplayConfig`, `SelectionConfig`, `NamesOnlyConfig` with ``preset="reference"``)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from configs import fast_pmi
from peft import LoraConfig
from transformers import TrainerCallback

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi import contrastive
from hf_pmi.contrastive import SelectionConfig, compensate_moments, train_contrastive
from hf_pmi.modeling import ContinualCLIPOutput
from hf_pmi.names_only import NamesOnlyConfig, make_names_only
from hf_pmi.names_only.config import lr_at_step
from hf_pmi.names_only.learner import MapDataset, inversion_config, names_only_weights
from hf_pmi.inversion import InversionConfig
from hf_pmi.replay import ReplayConfig, crop_box, random_resized_crop, replay_losses, task_weights
from hf_pmi.statistics import collect_layer_statistics
from hf_pmi.testing import build_clip


# ----- the presets -----------------------------------------------------------------------------------
def test_reference_presets_set_every_reference_behaviour_and_defaults_keep_hf_pmis():
    replay, ref = ReplayConfig(), ReplayConfig(preset="reference")
    assert (replay.teacher_text, replay.statistics_model, replay.statistics_crop) == ("teacher", "current", 1.0)
    assert (ref.teacher_text, ref.statistics_model, ref.statistics_crop) == ("student", "previous", 0.9)
    cfs, ref = SelectionConfig(), SelectionConfig(preset="reference")
    assert (cfs.unbiased_std, cfs.contrastive_keep, cfs.contrastive_drop_last) == (False, "pre_step", False)
    assert (ref.unbiased_std, ref.contrastive_keep, ref.contrastive_drop_last) == (True, "post_step", True)
    assert ref.sample_kwargs()["unbiased_std"] and ref.contrastive_kwargs() == {"contrastive_keep": "post_step",
                                                                                "contrastive_drop_last": True}
    names = NamesOnlyConfig(preset="reference")  # configs/moe_openset/cf100.yaml
    expected = dict(open_rf=0.02, num_train_epochs=1.0, repeats=10, schedule_epochs=3.0, warmup_steps=30,
                    batch_size=64, replay_batch_size=64, l_hkd=0.0, l_tkd=0.0, l_ft=0.001, ft_detach=True,
                    teacher_text="student", boundary_kd=0.0, scoring="adapted", per_class=20, neighbours=5,
                    gamma=0.1, learning_rate=5e-4, refine_lr=0.1, alpha_tv=0.0)
    assert {k: getattr(names, k) for k in expected} == expected
    ours = NamesOnlyConfig()
    assert (ours.open_rf, ours.repeats, ours.schedule_epochs, ours.l_hkd, ours.teacher_text) == (None, 1, None, None, None)
    assert ReplayConfig(preset="reference", statistics_crop=0.5).statistics_crop == 0.5  # a non-default value wins
    for bad in (lambda: ReplayConfig(preset="paper"), lambda: ReplayConfig(teacher_text="both"),
                lambda: ReplayConfig(statistics_crop=0.0), lambda: SelectionConfig(contrastive_keep="best"),
                lambda: NamesOnlyConfig(scoring="vote"), lambda: NamesOnlyConfig(repeats=0)):
        with pytest.raises(ValueError):
            bad()


# ----- replay path -------------------------------------------------------------------------------------
def _outputs(seed=0, b=5, c=6, n_old=4, p=8):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    s = torch.tensor(10.0)
    f_s, f_t = unit(b, p), unit(b, p)
    text_s = unit(c, p).requires_grad_(True)
    text_t = unit(c, p)
    pixels = unit(3, p)
    out = ContinualCLIPOutput(logits=s * pixels @ text_s.t(), replay_logits=s * f_s @ text_s.t(), image_embeds=pixels,
                              replay_image_embeds=f_s, text_embeds=text_s, logit_scale=s)
    teacher = ContinualCLIPOutput(replay_logits=s * f_t @ text_t.t(), replay_image_embeds=f_t, text_embeds=text_t,
                                  logit_scale=s)
    labels, replay_labels = torch.tensor([4, 5, 4]), torch.randint(n_old, (b,), generator=g)
    return out, teacher, labels, replay_labels, n_old


def test_teacher_text_student_scores_the_teachers_features_against_the_students_text():
    out, teacher, labels, replay_labels, n_old = _outputs()
    weights = {"ce": 1.0, "hkd": 1.0, "tkd": 1.0}
    # the definition (reference, prv_ft 0): | s f_s T_s_old^T - s f_t T_s_old^T |, gradient reaching T_s
    s, f_s, f_t, text = out.logit_scale, out.replay_image_embeds, teacher.replay_image_embeds, out.text_embeds
    expected = (s * f_s @ text[:n_old].t() - s * f_t @ text[:n_old].t()).abs().mean()
    hkd = replay_losses(out, teacher, labels, replay_labels, n_old, weights, 0.0, teacher_text="student")["hkd"]
    assert torch.allclose(hkd, expected)
    (grad,) = torch.autograd.grad(hkd, text)
    (expected_grad,) = torch.autograd.grad(expected, text)
    assert torch.allclose(grad, expected_grad) and grad[:n_old].abs().sum() > 0
    own = replay_losses(out, teacher, labels, replay_labels, n_old, weights, 0.0)["hkd"]  # hf_pmi: the teacher's own text
    assert torch.allclose(own, (out.replay_logits[:, :n_old] - teacher.replay_logits[:, :n_old]).abs().mean())
    # same image features, different text features: zero with the student's text, not with the teacher's
    teacher.replay_image_embeds = f_s.detach()
    assert replay_losses(out, teacher, labels, replay_labels, n_old, weights, 0.0, teacher_text="student")["hkd"] == 0
    assert replay_losses(out, teacher, labels, replay_labels, n_old, weights, 0.0)["hkd"] > 0.1


def test_crop_box_draws_the_reference_area_and_ratio_and_the_crop_resizes_that_box():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = crop_box(32, 32, 0.9, g)
        assert 0 <= top <= 32 - h and 0 <= left <= 32 - w
        assert 0.9 * 32 * 32 * 0.93 <= h * w <= 32 * 32  # area in [0.9, 1] of the image, up to rounding
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 / 0.9
    pixels = torch.randn(3, 3, 32, 32)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    cropped = random_resized_crop(pixels, 0.5, g1)
    for image, result in zip(pixels, cropped):
        top, left, h, w = crop_box(32, 32, 0.5, g2)
        expected = F.interpolate(image[None, :, top:top + h, left:left + w], size=(32, 32), mode="bilinear",
                                 align_corners=False, antialias=True)[0]
        assert torch.allclose(result, expected)
    assert not torch.allclose(cropped, pixels)


def _lora_model():
    return ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=4, lora_alpha=8))


def _args(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), method="pmi", max_steps=2, per_device_train_batch_size=16,
                warmup_steps=0, disable_tqdm=True, logging_steps=100)
    return ContinualConfig(**{**base, **kw})


@pytest.mark.parametrize("model_kind", ["previous", "current"])
def test_statistics_model_previous_collects_with_the_model_before_the_task(tmp_path, digits, processor, model_kind):
    """The first task's model before training is the raw CLIP (LoRA B starts at zero): with "previous" the
    bank's statistics are the raw CLIP's on the task's images, with "current" the trained model's."""
    tasks = split_class_incremental(digits, num_tasks=5, seed=0)
    tasks = dataclasses.replace(tasks, tasks=tasks.tasks[:1])
    torch.manual_seed(0)
    trainer = ContinualTrainer(model=_lora_model(), args=_args(tmp_path, model_kind, learning_rate=0.05),
                               tasks=tasks, processing_class=processor,
                               method_config=fast_pmi(replay={"statistics_model": model_kind}))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    pixels = [x for x, _ in trainer.method.real_batches(tasks[0].train)]
    with model.raw_clip() as clip:
        raw = collect_layer_statistics(clip, pixels)
    trained = collect_layer_statistics(model, pixels)
    bank = trainer.method.bank.statistics
    keys = [k for k in bank.keys() if k.startswith("layer1")]
    same_as = lambda other: all(torch.allclose(bank.mean(k), other.mean(k)) and  # noqa: E731
                                torch.allclose(bank.var(k), other.var(k)) for k in keys)
    assert not same_as(trained) or not same_as(raw)  # the two models differ after training
    assert same_as(raw if model_kind == "previous" else trained)


def test_cfs_compensation_with_the_unbiased_std():
    x, mean, std = torch.tensor([[0.0], [2.0]]), torch.zeros(1), torch.ones(1)
    r = 1 / math.sqrt(2)
    for exact in (False, True):  # reference formula and exact standardisation agree on this set
        assert torch.allclose(compensate_moments(x, mean, std, exact, unbiased_std=True), torch.tensor([[-r], [r]]))
        assert torch.allclose(compensate_moments(x, mean, std, exact), torch.tensor([[-1.0], [1.0]]))  # population


@pytest.mark.parametrize("keep", ["pre_step", "post_step"])
def test_contrastive_model_keeps_the_weights_around_its_lowest_loss_step(monkeypatch, keep):
    """n = 70 at batch 64: with drop_last one step per epoch (the trailing 6 dropped); the kept weights are
    those the lowest batch loss was measured with ("pre_step") or right after that step ("post_step")."""
    losses, states = [], []
    real_loss, real_step = contrastive.uniformity_loss, torch.optim.Adam.step

    def loss(z, tau):
        value = real_loss(z, tau)
        losses.append(value.item())
        return value

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        states.append([p.detach().clone() for group in self.param_groups for p in group["params"]])
        return result

    monkeypatch.setattr(contrastive, "uniformity_loss", loss)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    feats = torch.randn(70, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in contrastive.ContrastiveModel(6).parameters()]
    model = train_contrastive(feats, epochs=6, seed=0, keep=keep, drop_last=True)
    assert len(losses) == len(states) == 6  # one full batch per epoch
    best = min(range(6), key=losses.__getitem__)
    expected = states[best] if keep == "post_step" else (states[best - 1] if best else initial)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected))
    losses.clear(), states.clear()
    train_contrastive(feats, epochs=2, seed=0)  # hf_pmi's default: the trailing batch of 6 trains too
    assert len(losses) == 4


# ----- names-only path ---------------------------------------------------------------------------------
def test_names_only_inversion_weights_follow_open_rf():
    for blocks in (7, 15):  # the shapes CLIP, ViT-B/16
        config = inversion_config(InversionConfig(alpha_rf=0.002, alpha_tv=0.005), NamesOnlyConfig(preset="reference"))
        assert math.isclose(config.layer_weight(blocks), 0.02 * blocks) and config.alpha_rf == 0.02
        assert (config.alpha_tv, config.refine_lr, config.normalize_features) == (0.0, 0.1, True)
    ours = inversion_config(InversionConfig(alpha_rf=0.002), NamesOnlyConfig())
    assert ours.layer_weight(15) == 0.02 and ours.alpha_rf == 0.002  # today's: a_layer 0.02, the run's refinement KL


def test_names_only_distillation_weights_are_the_tasks_own_and_task_weighted():
    run = task_weights(10, 5, 1.0, 0.1, 0.2)
    assert names_only_weights(run, NamesOnlyConfig(), 10, 5) == run
    factors = task_weights(10, 5, 1.0, 1.0, 1.0)
    w = names_only_weights(run, NamesOnlyConfig(l_hkd=0.05, l_tkd=0.0), 10, 5)
    assert w["ce"] == run["ce"] and math.isclose(w["hkd"], 0.05 * factors["hkd"]) and w["tkd"] == 0.0
    data = MapDataset(torch.randn(6, 2, 2, 2), torch.arange(6), repeats=10)
    assert len(data) == 60 and torch.equal(data[15]["new_patch_maps"], data[3]["new_patch_maps"])


def test_names_only_task_takes_the_reference_schedule(tmp_path, digits, processor):
    """ceil(repeats * m * n / batch) steps per epoch, `num_train_epochs` epochs, and at every step the lr of a
    cosine schedule `schedule_epochs` long after a linear warm-up (`lr_at_step`)."""
    config = NamesOnlyConfig(per_class=4, neighbours=2, repeats=10, num_train_epochs=2.0, schedule_epochs=3.0,
                             warmup_steps=3, learning_rate=1e-3)
    tasks = make_names_only(split_class_incremental(digits, num_tasks=3, seed=0), config=config)
    torch.manual_seed(0)
    trainer = ContinualTrainer(model=_lora_model(), args=_args(tmp_path, "schedule", max_steps=-1, num_train_epochs=0.02),
                               tasks=tasks, processing_class=processor, method_config=fast_pmi())
    lrs = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if trainer.current_task == 2:
                lrs.append(optimizer.param_groups[0]["lr"])

    trainer.add_callback(Record())
    trainer.train()
    n = len(tasks[2].class_ids)
    per_epoch = math.ceil(10 * 4 * n / 16)
    assert len(lrs) == 2 * per_epoch
    expected = [lr_at_step(s, 1e-3, 3, 3 * per_epoch) for s in range(len(lrs))]
    assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(lrs, expected)), (lrs, expected)
    assert lrs[-1] > 1e-4  # stopped two thirds along the schedule, not at its end
