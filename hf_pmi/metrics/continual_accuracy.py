"""`evaluate` module for class-incremental accuracy: the accuracy matrix and its summaries.

Works offline: load it by path, or use the class directly.

Example:
    >>> import evaluate, hf_pmi.metrics.continual_accuracy as mod
    >>> metric = evaluate.load(mod.__file__)
    >>> metric.add_batch(predictions=[0, 1], references=[0, 1], after_task=[0, 0], task=[0, 0])
    >>> metric.add_batch(predictions=[1, 1, 2, 3], references=[0, 1, 2, 3], after_task=[1] * 4, task=[0, 0, 1, 1])
    >>> metric.compute()["a_last"]
    0.75
"""

import datasets
import evaluate

try:  # inside the package
    from hf_pmi.metrics import continual_metrics
except ImportError:  # loaded by path without hf_pmi installed: not supported, say so
    raise ImportError("continual_accuracy needs the hf_pmi package: pip install hf_pmi") from None

_DESCRIPTION = """Accuracy matrix A[i][j] (after task i, on task j's classes) with A_last, A_avg,
forgetting, BWT and old/new-class accuracy, as defined in the PMI paper (Tong et al., NeurIPS 2025)."""

_KWARGS = """
Args:
    predictions: predicted class ids.
    references: true class ids.
    after_task: index i of the last trained task when the prediction was made.
    task: index j of the task the example belongs to.
Returns:
    accuracy_matrix, a_last, a_avg, forgetting, bwt, all_seen_accuracy, old_class_accuracy,
    new_class_accuracy.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ContinualAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Tong, Lu, Liu, Gong. Model Inversion with Layer-Specific Modeling and Alignment for "
            "Data-Free Continual Learning. NeurIPS 2025. arXiv:2510.26311",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "after_task": datasets.Value("int32"),
                    "task": datasets.Value("int32"),
                }
            ),
        )

    def _compute(self, predictions, references, after_task, task):
        steps, tasks = max(after_task) + 1, max(task) + 1
        correct = [[0] * tasks for _ in range(steps)]
        total = [[0] * tasks for _ in range(steps)]
        for p, r, i, j in zip(predictions, references, after_task, task):
            correct[i][j] += int(p == r)
            total[i][j] += 1
        matrix = [[correct[i][j] / total[i][j] if total[i][j] else None for j in range(tasks)] for i in range(steps)]
        counts = [max(total[i][j] for i in range(steps)) for j in range(tasks)]
        return {"accuracy_matrix": matrix, **continual_metrics(matrix, counts)}
