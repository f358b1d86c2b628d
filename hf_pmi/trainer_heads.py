"""What `ContinualTrainer` does with a classifier head (`hf_pmi.heads`): choose it before any work, and add
each learned task's classes to it (the pooled features of the task's training images through the model as
trained), after the method moved the old classes' statistics where it can (``refresh_head``)."""

from __future__ import annotations


from .heads import TEXT, build_head
from .log import get_logger
from .names_only import is_names_only


logger = get_logger()


class ContinualHeadMixin:
    """The head part of `ContinualTrainer` (module docstring)."""

    def _setup_head(self) -> None:
        """The classifier head the model predicts with (`hf_pmi.heads`): ``args.head``; unset, a continued model's
        own, else the method's (`text` for names-only tasks: they have no image to take statistics from). Checked
        before any work: a continued model's old classes have statistics for its own head only."""
        model = self.accelerator.unwrap_model(self.model)
        names_only = any(is_names_only(t) for t in self.tasks)
        continued = self.tasks.task_offset > 0 or model.head is not None
        name = self.args.head or (model.head_name if continued else TEXT if names_only else self.method.default_head)
        if model.head is not None and name == TEXT and self.args.head:  # the text head knows every class
            logger.warning("head='text': the continued model's %s head and its statistics are dropped; it predicts "
                           "with its CLIP text head from now on.", model.head_name)
            model.set_head(None)
        if model.head_name != TEXT and name != model.head_name and model.num_classes:
            raise ValueError(
                f"The model predicts with the {model.head_name} head, whose statistics cover its {model.num_classes} "
                f"classes; a {name} head would know none of them. Continue with head={model.head_name!r} (or leave "
                f"`head` unset)."
            )
        if name != TEXT and names_only:
            raise ValueError(f"Names-only tasks have no image to collect the {name} head's statistics from: use "
                             f"head='text' (the CLIP text head, which knows every class; a continued model's {name} "
                             f"head is then dropped) for them.")
        if name != TEXT and model.head is None:
            if self.tasks.task_offset:
                raise ValueError(
                    f"The {name} head learns a class from its images as its task is trained, and the continued "
                    f"model's {model.num_classes} classes have no statistics: continue with head='text', or start the "
                    f"run from the first task with head={name!r}."
                )
            model.set_head(build_head(name, model.feature_dim, projection_dim=self.args.head_projection_dim,
                                      seed=self.args.seed, ridge_choice=self.args.head_ridge_choice))

    def _update_head(self, t: int) -> None:
        """Add task `t`'s classes to the head: the pooled features of its training images through the model as
        trained (each process sees all of them, so every process holds the same head); the method first moves
        the old classes' statistics to the current features where it can (``refresh_head``)."""
        model = self.accelerator.unwrap_model(self.model)
        if model.head is None:
            return
        model.eval()
        self.method.refresh_head(model)
        model.head.update(*self.method.pooled_features(model, self.tasks[t].train))
