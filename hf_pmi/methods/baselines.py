"""Reference points every other method is read against: `finetune`, `joint`, `zero_shot`, the
frozen-backbone heads `ncm` and `ranpac` (no training, no synthesis: the pre-trained features with a
classifier head that keeps class statistics, `hf_pmi.heads`), and `aper` (adapt on the first task, then
freeze, with such a head)."""

from __future__ import annotations

from .base import ContinualMethod, TaskPlan, register_method


@register_method("finetune")
class Finetune(ContinualMethod):
    """Lower bound: train on each task in turn with CE over all seen classes, nothing else."""


@register_method("joint")
class Joint(ContinualMethod):
    """Upper bound: train on the real data of every task seen so far. NOT data-free."""

    data_free = False

    def plan_task(self, task_id: int) -> TaskPlan:
        return TaskPlan(self.tasks.seen_train(task_id))

    def refresh_head(self, model) -> None:
        """Joint keeps every seen task's images, so its head is fitted anew on all of them through the model as
        trained (classes of a continued checkpoint, whose images it does not have, keep their statistics)."""
        head = model.head
        if head is None:
            return
        earlier = [t for t in self.tasks if t.train is not None and t.class_ids[-1] < head.num_classes]
        if not earlier or earlier[0].class_ids[0] != 0:
            return
        fresh = type(head)(head.feature_dim, **head.settings())
        for task in earlier:
            fresh.update(*self.pooled_features(model, task.train))
        model.set_head(fresh)


@register_method("zero_shot")
class ZeroShot(ContinualMethod):
    """No training: classify by class name only (meaningful only with a pre-trained CLIP)."""

    trains = False


@register_method("ncm")
class NearestClassMean(ContinualMethod):
    """Frozen backbone, nearest class mean of the pooled features (SimpleCIL). No training, no synthesis."""

    trains = False
    default_head = "ncm"


@register_method("ranpac")
class RanPAC(ContinualMethod):
    """Frozen backbone, ridge regression on a fixed random ReLU projection of the pooled features (RanPAC
    without its first-session adaptation). No training, no synthesis."""

    trains = False
    default_head = "ranpac"


@register_method("aper")
class FirstSessionAdaptation(ContinualMethod):
    """APER's (and RanPAC's) first-session adaptation: train on the first task only, then keep the backbone
    frozen, so a classifier head's statistics (default ``ranpac``) stay exact. No synthesis."""

    default_head = "ranpac"

    def trains_task(self, task_id: int) -> bool:
        return task_id == 0 and self.tasks.task_offset == 0
