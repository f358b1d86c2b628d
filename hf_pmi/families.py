"""Model families: what `ContinualTrainer` dispatches to, instead of switching on the model's type.

A family says whether it takes a model (`accepts`) or a finished task's folder (`accepts_checkpoint`) and
provides the hooks of a run: `setup` (checks and builds the trainer around the model), `train` (the task
loop), `continue_from` (``ContinualTrainer.from_pretrained`` of one of its folders), `save_untrained` (the
model and processor before any task finished) and `render_card` (the card of the latest task). The trainer
asks `family_for` / `family_for_checkpoint` and holds no family switch; a new family is one `register_family`.

Families shipped:

- ``clip``: a `ContinualCLIP`; the trainer's own per-task loop (`ContinualTrainer`, one ``Trainer.train()``
  per task, the methods of `hf_pmi.methods`);
- ``batchnorm``: an image classifier whose final linear layer can grow (`ResNet32ForImageClassification`,
  transformers' ResNet, ...); `hf_pmi.resnet.runner` (each phase of a task one ``Trainer.train()``).

Example:
    >>> from hf_pmi.families import family_for
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> family_for(ResNet32ForImageClassification(ResNet32Config(num_labels=2))).name
    'batchnorm'
    >>> family_for(object())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: model must be a ContinualCLIP (...) or an image classifier whose head can grow (...); got object.
"""

from __future__ import annotations

FAMILIES: list = []


def register_family(family) -> None:
    """Add `family` (an object with the hooks of the module docstring); later ones are asked first."""
    FAMILIES.insert(0, family)


def family_for(model):
    """The family that accepts `model`; a `TypeError` naming every family's models otherwise."""
    for family in FAMILIES:
        if family.accepts(model):
            return family
    kinds = " or ".join(f.describe for f in FAMILIES)
    raise TypeError(f"model must be {kinds}; got {type(model).__name__}.")


def family_for_checkpoint(state: dict):
    """The family whose task folder has this state (``continual_state.json``)."""
    for family in FAMILIES:
        if family.accepts_checkpoint(state):
            return family
    raise ValueError(f"No model family reads a task folder of format {state.get('format')!r}.")


class CLIPFamily:
    """A `ContinualCLIP`: the trainer's own per-task loop (`hf_pmi.trainer`)."""

    name = "clip"
    describe = "a ContinualCLIP (wrap a CLIPModel with `ContinualCLIP.from_clip(clip)`)"

    def accepts(self, model) -> bool:
        from .modeling import ContinualCLIP

        return isinstance(model, ContinualCLIP)

    def accepts_checkpoint(self, state: dict) -> bool:
        return "format" not in state  # CLIP task folders predate the format field

    def setup(self, trainer, model, args, tasks, processing_class, method_config=None, **kwargs) -> None:
        trainer._setup_clip(model, args, tasks, processing_class, method_config, **kwargs)

    def train(self, trainer, resume_from_checkpoint, **kwargs):
        return trainer._train_clip(resume_from_checkpoint, **kwargs)

    def continue_from(self, cls, folder, state, source, tasks, args, processing_class=None, **kwargs):
        return cls._continue_clip(folder, state, source, tasks, args, processing_class, **kwargs)

    def save_untrained(self, trainer, output_dir: str) -> None:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(output_dir, processor=trainer.processing_class)

    def render_card(self, trainer, folder: str, **overrides) -> str:
        return trainer._render_clip_card(folder, **overrides)


class BatchNormFamily:
    """An image classifier with a growable linear head (and BatchNorm, for the inverting methods):
    `hf_pmi.resnet.runner`."""

    name = "batchnorm"
    describe = ("an image classifier whose head can grow (ResNet32ForImageClassification, transformers' ResNet, "
                "...: a final nn.Linear)")

    def accepts(self, model) -> bool:
        from .resnet.continual import own_classes

        try:
            own_classes(model)
        except (TypeError, AttributeError, ValueError):
            return False
        return True

    def accepts_checkpoint(self, state: dict) -> bool:
        from .resnet.checkpoint import FORMAT

        return state.get("format") == FORMAT

    def setup(self, trainer, model, args, tasks, processing_class, method_config=None, **kwargs) -> None:
        from .resnet.runner import setup_batchnorm

        setup_batchnorm(trainer, model, args, tasks, processing_class, method_config, **kwargs)

    def train(self, trainer, resume_from_checkpoint, **kwargs):
        try:
            return trainer.family_run.train(resume_from_checkpoint, trainer._task_event)
        finally:
            trainer.callback_handler.finish(trainer.args, trainer.state, trainer.control)

    def continue_from(self, cls, folder, state, source, tasks, args, processing_class=None, **kwargs):
        from .resnet.runner import continue_batchnorm

        return continue_batchnorm(cls, folder, state, source, tasks, args, processing_class, **kwargs)

    def save_untrained(self, trainer, output_dir: str) -> None:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(output_dir)
        trainer.family_run.processor.save_pretrained(output_dir)

    def render_card(self, trainer, folder: str, **overrides) -> str:
        import os
        import shutil

        if trainer.is_world_process_zero():  # the BN family's task folders carry their rendered card
            shutil.copy(os.path.join(folder, "README.md"), trainer.args.output_dir)
        return os.path.join(trainer.args.output_dir, "README.md")


register_family(BatchNormFamily())
register_family(CLIPFamily())
