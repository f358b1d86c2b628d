"""Model cards for continual CLIP checkpoints: metadata the Hub validates, results, how to load.

`render_model_card(state)` fills the Jinja2 template `model_cards/continual_clip.md` from a plain
`state` dict; `write_model_card(folder, state)` writes it as `README.md` next to an
`accuracy_matrix.png` heatmap. Write the card *after* `save_pretrained` (peft writes its own README).

The `state` dict (accuracies are fractions in [0, 1]; the card shows percentages):

| key | type | meaning |
|---|---|---|
| `accuracy_matrix` (required) | list of rows of float or None | `A[i][j]`: accuracy on task j's classes after training task i; None (or a short row) for tasks not seen yet |
| `num_tasks` (required) | int | tasks in the whole sequence |
| `task_id` (required) | int | 0-based index of the last finished task (the checkpoint's branch is `task-{task_id}`) |
| `base_model` | str or None | Hub id of the pre-trained CLIP (anything else, e.g. a local path, is not shown) |
| `base_in_checkpoint` | bool | the base has no Hub id and its weights are in the checkpoint's `base/` |
| `dataset` | str or None | Hub dataset id (or a free-form name) |
| `method` | str, dict or None | a description, or `{"name": ..., "description": ..., <setting>: <value>, ...}` |
| `data_free` | bool or None | True: no real image of an earlier task was kept; False: the method keeps or revisits real data |
| `templates` | list[str] or None | the prompt templates the class names were put in (`"a photo of a {}."`) |
| `has_feature_bank` | bool | the checkpoint has a `feature_bank/` (the how-to-load snippet then loads it) |
| `class_order` | list[int] or None | label ids in the order the classes arrive |
| `class_names` | list[str] or None | `class_names[label_id]` |
| `task_classes` | list[list[int]] or None | label ids of each task (default: `class_order` cut into `num_tasks` equal parts) |
| `a_last`, `a_avg`, `forgetting`, `bwt` | float or None | A_last, A_avg, average forgetting, backward transfer |
| `unevaluated_tasks` | list[int] or None | seen tasks not evaluated after the last task (A_last then says so) |
| `seen_accuracy` | list[float] or None | accuracy over all seen classes after each task (adds a column) |
| `old_accuracy`, `new_accuracy` | float or None | old-class / new-class accuracy after the last task |
| `inversion` | dict or None | inversion settings (any keys) plus cost keys `seconds` and `full_model_passes` |
| `repo_id` | str or None | Hub repo for the how-to-load snippets (None: a local folder, loaded by its path) |
| `replay_grid` | str or None | file name of an image of replay samples, in the same folder |
| `names_only_classes` | list[str] or None | classes learned from their names only (no image) |
| `routed_classes` | list[str] or None | those scored by the pre-trained CLIP at inference (`route_classes`) |
| `tags` | list[str] or None | extra Hub tags |
| `license` | str or None | Hub licence id of the model (the base model's, when known); None: "other", and the card says the licence was not determined |
| `license_source` | str or None | where the licence comes from, shown next to it (e.g. "the base model's") |
| `library_name` | str | default "hf_pmi" (the folder root is an hf_pmi checkpoint; `clip/` is a transformers CLIPModel) |
| `base_model_relation` | str or None | "adapter" (LoRA) or "finetune": how the checkpoint relates to `base_model` |
| `lora` | dict or None | LoRA settings (r, alpha, target modules) shown in the card |
| `hyperparameters` | dict or None | training hyper-parameters (a table) |
| `framework_versions` | dict or None | package -> version |
| `replay_grid_caption` | str or None | caption under the replay grid |
| `model_name` | str or None | title of the card (default: `repo_id`) |

Example:
    >>> from hf_pmi.model_card import render_model_card
    >>> card = render_model_card({
    ...     "accuracy_matrix": [[0.9, None], [0.8, 0.85]], "num_tasks": 2, "task_id": 1,
    ...     "base_model": "openai/clip-vit-base-patch16", "dataset": "uoft-cs/cifar100",
    ...     "class_order": [0, 1, 2, 3], "class_names": ["apple", "bee", "cat", "dog"],
    ...     "a_last": 0.82, "a_avg": 0.86, "forgetting": 0.1, "bwt": -0.1, "repo_id": "me/clip-pmi",
    ... })
    >>> "| 1 | 80.00 | 85.00 |" in card
    True
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from pathlib import Path

from .metrics import a_last_scope
from .resolve import hub_repo_id

TEMPLATE_NAME = "continual_clip.md"
HEATMAP_NAME = "accuracy_matrix.png"
BASE_TAGS = ["hf_pmi", "continual-learning", "class-incremental-learning", "clip"]  # more by what the run did
_REQUIRED = ("accuracy_matrix", "num_tasks", "task_id")
_COST_KEYS = ("seconds", "full_model_passes")


def card_tags(method: str, data_free: bool | None, inverts: bool, lora: bool) -> list[str]:
    """The Hub tags of a card beyond `BASE_TAGS`: the method, and what the run did (each tag once)."""
    tags = [method] + (["data-free"] if data_free else []) + (["model-inversion"] if inverts else [])
    return tags + (["lora", "peft"] if lora else [])


def find_template(name: str = TEMPLATE_NAME) -> Path:
    """Where the card template is: inside the installed package (`hf_pmi/model_cards/`, see the
    pyproject `package-dir` mapping) or, in a source checkout, the repo's top-level `model_cards/`."""
    from importlib import resources

    candidates = []
    try:
        candidates.append(Path(str(resources.files("hf_pmi").joinpath("model_cards", name))))
    except (ModuleNotFoundError, TypeError):
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "model_cards" / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Model card template {name!r} not found (looked in {', '.join(map(str, candidates))}). Reinstall "
        "hf_pmi (`pip install -e .` from the repo, or a wheel that ships hf_pmi/model_cards/), or pass "
        "template_path=... explicitly."
    )


def _pct(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * float(value):.2f}"


def _pp(value) -> str:
    """Percentage points with a sign (forgetting / BWT)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * float(value):+.2f}"


def _cell(value) -> str:
    """A value safe inside a markdown table cell: an enum by its value, floats short, nothing empty ("–": not set)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, float):
        value = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        value = ", ".join(map(_cell, value))
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if value is not None and text.strip() else "–"


def _literal(text: str) -> str:
    """A Python string literal of `text` in double quotes (a JSON string is one)."""
    return json.dumps(text, ensure_ascii=False)


def _square(matrix, num_tasks: int) -> list[list]:
    rows = [list(row) + [None] * (num_tasks - len(row)) for row in matrix]
    if any(len(row) > num_tasks for row in rows):
        raise ValueError(f"accuracy_matrix has rows longer than num_tasks={num_tasks}.")
    return rows


def _check(state: dict) -> None:
    missing = [k for k in _REQUIRED if state.get(k) is None]
    if missing:
        raise ValueError(
            f"The model card state lacks {missing}; see the `state` table in hf_pmi.model_card's docstring."
        )
    if len(state["accuracy_matrix"]) > state["num_tasks"]:
        raise ValueError("accuracy_matrix has more rows than num_tasks.")


def _task_classes(state: dict) -> list[list[int]]:
    if state.get("task_classes"):
        return [list(t) for t in state["task_classes"]]
    order, n = state.get("class_order"), state["num_tasks"]
    if not order:
        return []
    size, extra = divmod(len(order), n)
    out, start = [], 0
    for t in range(n):
        stop = start + size + (1 if t < extra else 0)
        out.append(list(order[start:stop]))
        start = stop
    return out


def card_data(state: dict):
    """The `huggingface_hub.ModelCardData` (YAML metadata) of the card."""
    from huggingface_hub import EvalResult, ModelCardData

    tags = list(dict.fromkeys(BASE_TAGS + list(state.get("tags") or [])))
    base_model = hub_repo_id(state.get("base_model"))
    dataset = hub_repo_id(state.get("dataset"))
    model_name = state.get("model_name") or state.get("repo_id") or "continual-clip"
    eval_results = None
    if dataset and state.get("a_last") is not None and not state.get("unevaluated_tasks"):  # all seen classes
        eval_results = [
            EvalResult(
                task_type="zero-shot-image-classification",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type="accuracy",
                metric_name=f"A_last ({state['task_id'] + 1}/{state['num_tasks']} tasks)",
                metric_value=round(100 * float(state["a_last"]), 2),
            )
        ]
    relation = state.get("base_model_relation") if base_model else None
    return ModelCardData(
        base_model=base_model,
        base_model_relation=relation,
        datasets=[dataset] if dataset else None,
        library_name=state.get("library_name", "hf_pmi"),
        pipeline_tag="zero-shot-image-classification",
        license=state.get("license") or "other",
        tags=tags,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )


def _context(state: dict, heatmap: str | None) -> dict:
    num_tasks, task_id = state["num_tasks"], state["task_id"]
    matrix = _square(state["accuracy_matrix"], num_tasks)
    seen = state.get("seen_accuracy")
    header = ["After task"] + [f"Task {j}" for j in range(num_tasks)] + (["All seen"] if seen else [])
    rows = []
    for i, row in enumerate(matrix):
        cells = [str(i)] + [_pct(v) for v in row]
        if seen:
            cells.append(_pct(seen[i]) if i < len(seen) else "–")
        rows.append(cells)

    metrics = [
        ("A_last", _pct(state.get("a_last")), f"accuracy over {a_last_scope(state.get('unevaluated_tasks'))} after "
         f"the latest finished task"),
        ("A_avg", _pct(state.get("a_avg")), "mean over tasks t of the all-seen accuracy after task t"),
        ("Forgetting", _pct(state.get("forgetting")), "mean over old tasks j of max_i A[i][j] - A[T][j]"
         + ("; – : no old task was evaluated" if state.get("forgetting") is None else "")),
        ("BWT", _pp(state.get("bwt")), "mean over old tasks j of A[T][j] - A[j][j]"),
    ]
    if state.get("old_accuracy") is not None:
        metrics.append(("Old classes", _pct(state["old_accuracy"]), "accuracy on classes of earlier tasks"))
    if state.get("new_accuracy") is not None:
        metrics.append(("New classes", _pct(state["new_accuracy"]), "accuracy on the last task's classes"))

    names = state.get("class_names") or []
    from_names, routed = set(state.get("names_only_classes") or []), set(state.get("routed_classes") or [])
    tasks = []
    for t, ids in enumerate(_task_classes(state)):
        labels = [names[i] if i < len(names) else str(i) for i in ids]
        for k, label in enumerate(labels):
            if label in from_names:
                routed_note = "; scored by the pre-trained CLIP" if label in routed else ""
                labels[k] = f"{label} (learned from its name only, no image{routed_note})"
        tasks.append({"index": t, "classes": _cell(", ".join(labels))})
    seen_classes = sum(len(ids) for ids in _task_classes(state)[: task_id + 1]) or "?"

    method = state.get("method")
    if isinstance(method, dict):
        method = dict(method)
        name = method.pop("name", "PMI")
        description = method.pop("description", None)
        items = [(_cell(k), _cell(v)) for k, v in method.items()]
    else:
        name, description, items = (method or "PMI"), None, []
    description = description or (
        "After each task the model keeps, per class, a Gaussian of its image features and a small contrastive "
        "MLP, plus class-agnostic per-layer activation statistics of the vision tower, never an image. Before "
        "the next task, feature targets are drawn per old class (contrastive feature selection), inverted block "
        "by block through the vision tower with per-layer statistics alignment, and refined through the full "
        "model. The next task trains on its real images plus these replay samples, with logit and text-feature "
        "distillation from the previous model."
    )

    inversion = state.get("inversion")
    inversion_ctx = None
    if inversion:
        settings = [(_cell(k), _cell(v)) for k, v in inversion.items() if k not in _COST_KEYS]
        cost = []
        if inversion.get("seconds") is not None:
            cost.append(f"{float(inversion['seconds']):.1f} s of wall-clock time")
        if inversion.get("full_model_passes") is not None:
            cost.append(f"{int(inversion['full_model_passes'])} full-model forward+backward passes")
        inversion_ctx = {"settings": settings, "cost": ", ".join(cost) or "not recorded"}

    repo_id = state.get("repo_id")
    order = state.get("class_order")
    lora = state.get("lora")
    base_model = hub_repo_id(state.get("base_model"))
    if base_model:
        base_display = f"`{base_model}`"
    elif state.get("base_in_checkpoint"):
        base_display = "a CLIP model without a Hub id, saved with this checkpoint in `base/`"
    else:
        base_display = "a CLIP model without a Hub id (its weights, fine-tuned, are in `clip/`)"
    templates = list(state.get("templates") or [])
    license_id = state.get("license")
    return {
        "lora": ", ".join(f"{k} {_cell(v)}" for k, v in lora.items()) if isinstance(lora, dict) else lora,
        "hyperparameters": [(_cell(k), _cell(v)) for k, v in (state.get("hyperparameters") or {}).items()],
        "framework_versions": list((state.get("framework_versions") or {}).items()),
        "replay_grid_caption": state.get("replay_grid_caption")
        or "Synthetic samples used to rehearse the old classes, each titled with its class.",
        "title": state.get("model_name") or repo_id or "Continual CLIP (hf_pmi)",
        "task_id": task_id,
        "tasks_done": task_id + 1,
        "num_tasks": num_tasks,
        "num_seen_classes": seen_classes,
        "base_model_display": base_display,
        "dataset_display": f"`{state['dataset']}`" if state.get("dataset") else "not recorded",
        "method_summary": _cell(name),
        "head": state.get("head") or "text",
        "head_display": HEAD_DISPLAY.get(state.get("head") or "text", _cell(state.get("head"))),
        "method_description": description,
        "method_items": items,
        "data_free": state.get("data_free"),
        "inverts": bool(inversion),
        "metrics": [{"name": a, "value": b, "definition": c} for a, b, c in metrics],
        "matrix": {"header": header, "rows": rows},
        "heatmap": heatmap,
        "class_order_display": ", ".join(map(str, order)) if order else "not recorded",
        "tasks": tasks,
        "routed_classes": sorted(routed),
        "inversion": inversion_ctx,
        "replay_grid": state.get("replay_grid"),
        "repo_id": repo_id,
        "checkpoint": _literal(repo_id or f"path/to/task-{task_id}"),  # Python literals for the snippets
        "revision": _literal(f"task-{task_id}") if repo_id else None,
        "has_feature_bank": bool(state.get("has_feature_bank", True)),
        "templates_display": ", ".join(f"`{t}`" for t in templates) if templates else "not recorded",
        "hypothesis_template": _literal(templates[0] if templates else "{}"),
        "several_templates": len(templates) > 1,
        "license_display": f"`{license_id}`" + (f" ({state['license_source']})" if state.get("license_source") else "")
        if license_id else None,
    }


HEAD_DISPLAY = {
    "text": "the CLIP text head (cosine of the image features to each class name's prompt embedding)",
    "ncm": "`ncm`, nearest class mean of the pooled image features (`head/`, class statistics only)",
    "ranpac": "`ranpac`, ridge regression on a fixed random projection of the pooled image features (`head/`, "
              "class statistics only)",
}


def render_card(data, template: str | os.PathLike, **context) -> str:
    """The README.md text of a card of either family: `data` (a `huggingface_hub.ModelCardData`, the YAML block)
    and the Jinja2 `template` (a name in `model_cards/`, or a path) filled with `context`; runs of blank lines
    squeezed, and the YAML block checked to parse.

    Example:
        >>> from huggingface_hub import ModelCardData
        >>> text = render_card(ModelCardData(license="mit"), "resnet_continual.md", title="t", num_seen_classes=2)
        >>> text.splitlines()[1]
        'license: mit'
    """
    from huggingface_hub import ModelCard

    path = Path(template) if Path(template).is_file() else find_template(str(template))
    card = ModelCard.from_template(data, template_path=str(path), **context)
    text = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip("\n") + "\n"
    ModelCard(text)  # raises if the YAML block does not parse
    return text


def render_model_card(state: dict, template_path: str | os.PathLike | None = None) -> str:
    """The README.md text (YAML metadata + markdown) for a continual CLIP checkpoint.

    See the module docstring for the `state` keys. The result parses with `huggingface_hub.ModelCard`
    (checked here). A `state["heatmap"]` file name, if set, is shown as the accuracy-matrix image
    (`write_model_card` sets it).

    Example:
        >>> from huggingface_hub import ModelCard
        >>> from hf_pmi.model_card import render_model_card
        >>> text = render_model_card({"accuracy_matrix": [[0.5]], "num_tasks": 1, "task_id": 0})
        >>> ModelCard(text).data.pipeline_tag
        'zero-shot-image-classification'
    """
    _check(state)
    return render_card(card_data(state), template_path if template_path is not None else TEMPLATE_NAME,
                       **_context(state, state.get("heatmap")))


def plot_accuracy_matrix(accuracy_matrix, num_tasks: int, path: str | os.PathLike) -> str:
    """Save a heatmap (percentages, unseen cells blank) of the accuracy matrix as a PNG."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _square(accuracy_matrix, num_tasks)
    values = np.array([[np.nan if v is None else 100 * float(v) for v in row] for row in rows], dtype=float)
    values = np.ma.masked_invalid(values)
    size = 1.6 + 0.6 * num_tasks
    fig = Figure(figsize=(size + 1.2, 0.6 * len(rows) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if values.mask is np.ma.nomask or not values.mask[i, j]:
                v = values[i, j]
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
    ax.set_xticks(range(num_tasks))
    ax.set_yticks(range(len(rows)))
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.set_title("Accuracy A[i][j] (%)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
    return os.fspath(path)


def write_model_card(folder: str | os.PathLike, state: dict, template_path: str | os.PathLike | None = None) -> str:
    """Write `README.md` and `accuracy_matrix.png` into `folder`; returns the README path.

    Example:
        >>> import tempfile
        >>> from hf_pmi.model_card import write_model_card
        >>> folder = tempfile.mkdtemp()
        >>> readme = write_model_card(folder, {"accuracy_matrix": [[0.9, None], [0.8, 0.85]], "num_tasks": 2, "task_id": 1})
        >>> sorted(os.listdir(folder))
        ['README.md', 'accuracy_matrix.png']
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check(state)
    plot_accuracy_matrix(state["accuracy_matrix"], state["num_tasks"], folder / HEATMAP_NAME)
    text = render_model_card({**state, "heatmap": HEATMAP_NAME}, template_path=template_path)
    readme = folder / "README.md"
    readme.write_text(text, encoding="utf-8")
    return str(readme)


def write_adapter_card(folder: str, base_model: str | None) -> None:
    """Replace peft's empty README in ``adapter/`` by a short card that points to the checkpoint.

    `base_model` is the base's Hub id, or None when the base has none (its weights are then in ``base/``)."""
    from huggingface_hub import ModelCard, ModelCardData

    base_model = hub_repo_id(base_model)
    data = ModelCardData(base_model=base_model, library_name="peft", tags=["lora", "hf_pmi", "continual-learning"])
    base = f"`{base_model}`" if base_model else "the checkpoint's `base/` (a CLIP model without a Hub id)"
    text = (
        f"---\n{data.to_yaml()}\n---\n\n# LoRA adapter of an hf_pmi continual CLIP checkpoint\n\n"
        "The LoRA adapter of the checkpoint one folder up (see its README for the results). Load it on the base "
        f"model, {base}, with `PeftModel.from_pretrained(base, path, subfolder=\"adapter\")`; the parent folder's "
        "`clip/` holds the same model merged, and `ContinualCLIP.from_pretrained(path)` loads everything.\n"
    )
    ModelCard(text)  # the YAML parses
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)
