import math

import evaluate
import pytest

import hf_pmi.metrics.continual_accuracy as module
from hf_pmi.metrics import continual_metrics

A = [[0.9, None, None], [0.6, 0.8, None], [0.5, 0.4, 0.7]]


def test_definitions_of_method_md():
    m = continual_metrics(A)
    assert m["a_last"] == pytest.approx((0.5 + 0.4 + 0.7) / 3)
    assert m["a_avg"] == pytest.approx((0.9 + 0.7 + (0.5 + 0.4 + 0.7) / 3) / 3)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.4)) / 2)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.4 - 0.8)) / 2)
    assert m["new_class_accuracy"] == [0.9, 0.8, 0.7]
    assert m["old_class_accuracy"][0] is None
    assert m["old_class_accuracy"][2] == pytest.approx(0.45)


def test_all_seen_accuracy_is_pooled_over_examples():
    m = continual_metrics([[1.0, None], [1.0, 0.0]], counts=[30, 10])
    assert m["a_last"] == pytest.approx(0.75)


def test_evaluate_module_loads_offline_by_path():
    metric = evaluate.load(module.__file__)
    metric.add_batch(predictions=[0, 1], references=[0, 1], after_task=[0, 0], task=[0, 0])
    metric.add_batch(predictions=[1, 1, 2, 2], references=[0, 1, 2, 3], after_task=[1] * 4, task=[0, 0, 1, 1])
    out = metric.compute()
    assert out["accuracy_matrix"] == [[1.0, None], [0.5, 0.5]]
    assert out["a_last"] == 0.5 and out["forgetting"] == 0.5
    assert not any(isinstance(v, float) and math.isnan(v) for v in out.values())
