"""Command-line flags of the method configs: one argument group per config, every flag prefixed.

A method's config (`hf_pmi.methods.MethodConfig`) is either flat (its fields are settings) or
composed of flat parts (every field is itself a config dataclass, e.g. `PMIConfig` holds a
`ReplayConfig`, an `InversionConfig`, a `SamplingConfig` and a `SelectionConfig`). Each flat part
declares a ``flag_prefix`` and becomes one argument group whose flags are ``--<prefix><field>``,
so that no flag is ambiguous next to `TrainingArguments` (``--inversion_batch_size`` is the
inversion's batch, ``--per_device_train_batch_size`` the Trainer's). The Python names stay short:
``PMIConfig().inversion.batch_size``.

`GroupedArgumentParser` shows every config as a titled group in ``--help`` (a config that lists
``flag_groups`` is split into several), so that ``hf-pmi train --help`` reads by config: recipe,
continual run, method, Trainer.

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Knobs:
    ...     flag_prefix = "knob_"
    ...     steps: int = field(default=3, metadata={"help": "How many."})
    >>> flags = flag_dataclasses(Knobs)
    >>> parsed = HfArgumentParser(flags).parse_args_into_dataclasses(["--knob_steps", "5"])
    >>> from_flags(Knobs, parsed)
    Knobs(steps=5)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from typing import Any, Sequence

from transformers import HfArgumentParser

_FLAG_CLASSES: dict[type, type] = {}


def config_parts(config_cls: type) -> list[tuple[str | None, type]]:
    """``[(field name, flat config class)]`` of a composed config, or ``[(None, config_cls)]`` for a flat one."""
    fields = [f for f in dataclasses.fields(config_cls) if f.init]
    hints = typing.get_type_hints(config_cls)
    parts = [(f.name, hints[f.name]) for f in fields]
    if parts and all(dataclasses.is_dataclass(t) for _, t in parts):
        return parts
    return [(None, config_cls)]


def _flag_class(cls: type) -> type:
    """A dataclass of `cls`'s fields renamed ``<prefix><name>``, with the same types, defaults and help."""
    if cls in _FLAG_CLASSES:
        return _FLAG_CLASSES[cls]
    prefix = getattr(cls, "flag_prefix", "")
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kw: dict[str, Any] = {"metadata": f.metadata}
        if f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        else:
            kw["default"] = f.default
        specs.append((prefix + f.name, hints[f.name], dataclasses.field(**kw)))
    flags = dataclasses.make_dataclass(f"{cls.__name__}Flags", specs)
    flags._argument_group_name = getattr(cls, "argument_group", cls.__name__)
    flags.config_class = cls
    _FLAG_CLASSES[cls] = flags
    return flags


def flag_dataclasses(config_cls: type) -> tuple[type, ...]:
    """The dataclasses `HfArgumentParser` parses for `config_cls` (one per flat part)."""
    return tuple(_flag_class(part) for _, part in config_parts(config_cls))


def _unflag(part: type, parsed) -> Any:
    prefix = getattr(part, "flag_prefix", "")
    names = [f.name for f in dataclasses.fields(part) if f.init]
    return part(**{name: getattr(parsed, prefix + name) for name in names})


def from_flags(config_cls: type, parsed: Sequence) -> Any:
    """The config built from the parsed flag dataclasses (in the order of `flag_dataclasses`)."""
    parts = config_parts(config_cls)
    if len(parsed) != len(parts):
        raise ValueError(f"{config_cls.__name__} has {len(parts)} flag groups, got {len(parsed)} parsed objects.")
    if parts[0][0] is None:
        return _unflag(config_cls, parsed[0])
    return config_cls(**{name: _unflag(part, obj) for (name, part), obj in zip(parts, parsed)})


def flag_names(config_cls: type) -> set[str]:
    """Every flag (destination name) of `config_cls`."""
    return {f.name for flags in flag_dataclasses(config_cls) for f in dataclasses.fields(flags)}


def group_title(dtype: type, name: str) -> str:
    """The ``--help`` group of field `name` of dataclass `dtype`: the title in its ``flag_groups``
    (``{title: field names}``) that lists it, else its ``default_flag_group``, its
    ``_argument_group_name`` (a method config's flags), or "recipe (<class name>)"."""
    for title, names in getattr(dtype, "flag_groups", {}).items():
        if name in names:
            return title
    return (getattr(dtype, "default_flag_group", None) or getattr(dtype, "_argument_group_name", None)
            or f"recipe ({dtype.__name__})")


class GroupedArgumentParser(HfArgumentParser):
    """An `HfArgumentParser` that puts each flag in the ``--help`` group `group_title` names.

    Example:
        >>> from hf_pmi.config import ContinualConfig
        >>> text = GroupedArgumentParser([ContinualConfig]).format_help()
        >>> text.index("continual run (ContinualConfig):") < text.index("--method") < text.index("Trainer (")
        True
    """

    def __init__(self, dataclass_types, last_groups: Sequence[str] = (), **kwargs):
        kwargs.setdefault("usage", "%(prog)s [--flag value ...]  (the flags, by config, below)")
        super().__init__(dataclass_types, **kwargs)
        groups = self._action_groups  # argparse shows groups in this order: the `last_groups` go to the end
        self._action_groups = [g for g in groups if g.title not in last_groups] + [
            g for g in groups if g.title in last_groups]

    def _add_dataclass_arguments(self, dtype: type) -> None:
        hints = typing.get_type_hints(dtype)
        groups: dict[str, Any] = {}
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            title = group_title(dtype, f.name)
            if title not in groups:
                groups[title] = self.add_argument_group(title)
            f.type = hints[f.name]
            self._parse_dataclass_field(groups[title], f)


def config_file(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    r"""``--config run.yaml`` (as trl's parser offers): the flags of a YAML (or JSON) file of ``flag: value``
    pairs, as defaults that the command line overrides. Returns `argv` without ``--config`` and the file's values.

    Example:
        >>> import tempfile
        >>> path = tempfile.mktemp(suffix=".yaml")
        >>> _ = open(path, "w").write("method: lwf\nlearning_rate: 0.01\n")
        >>> config_file(["--config", path, "--seed", "3"])
        (['--seed', '3'], {'method': 'lwf', 'learning_rate': 0.01})
    """
    argv, values, i = list(argv), {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            del argv[i : i + (1 if "=" in arg else 2)]
            if not path or not os.path.isfile(path):
                raise SystemExit(f"error: --config needs a YAML file of `flag: value` lines; {path!r} is not a file.")
            import yaml

            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise SystemExit(f"error: {path} must hold `flag: value` pairs (a mapping), got {type(loaded).__name__}.")
            values.update({str(k).lstrip("-"): v for k, v in loaded.items()})
            continue
        i += 1
    return argv, values


def parse_flags(parser: HfArgumentParser, argv: Sequence[str] | None, file_values: dict[str, Any] | None = None
                ) -> tuple:
    """``parser.parse_args_into_dataclasses(argv)``, where flags the parser does not know end in a usage error
    (exit status 2) that names them and the closest known flag, instead of a traceback.

    Example:
        >>> from hf_pmi.config import ContinualConfig
        >>> parse_flags(HfArgumentParser([ContinualConfig]), ["--output_dir", "o", "--lerning_rate", "1"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    import difflib

    argv, values = config_file(sys.argv[1:] if argv is None else argv)
    values = {**(file_values or {}), **values}
    known = [f"--{f.name}" for dtype in parser.dataclass_types for f in dataclasses.fields(dtype)]
    unknown = [k for k in values if f"--{k}" not in known]
    if unknown:
        hints = [k + (f" (did you mean {c[0][2:]}?)" if (c := difflib.get_close_matches(f"--{k}", known, n=1, cutoff=0.75))
                      else "") for k in unknown]
        parser.error(f"unknown setting{'s' if len(unknown) > 1 else ''} in the --config file: {', '.join(hints)}.")
    parser.set_defaults(**values)  # the command line overrides the file
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        unknown = [a.split("=", 1)[0] for a in rest if a.startswith("-")] or rest
        hints = []
        for flag in unknown:
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
            hints.append(f"{flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        parser.error(f"unknown flag{'s' if len(unknown) > 1 else ''} {', '.join(hints)}. `--help` lists the flags; "
                     f"a method's own flags exist only with its --method.")
    return tuple(parsed)


#: The flags ``--help`` shows (the rest is behind ``--help-all``): what most runs set.
COMMON_FLAGS = ("output_dir", "model_name_or_path", "dataset_name", "data_dir", "test_split", "num_tasks", "method",
                "seed", "max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size", "lora_r",
                "resume_from_checkpoint", "push_to_hub", "hub_model_id", "report_to")


def short_help(prog: str | None, classes: Sequence[type], defaults: dict[str, Any] | None = None,
               common: Sequence[str] = COMMON_FLAGS) -> str:
    """The short ``--help`` of a run: the `common` flags of `classes` (dataclasses) with their help and default
    (a recipe's `defaults` first), then how to see every flag (``--help-all``).

    Example:
        >>> from hf_pmi.config import ContinualConfig
        >>> text = short_help("hf-pmi train", [ContinualConfig])
        >>> "--method" in text and "--help-all" in text and text.count("\\n") < 60
        True
    """
    import argparse

    fields = {}
    for dtype in classes:
        for f in dataclasses.fields(dtype):
            fields.setdefault(f.name, f)
    total = len(fields)
    parser = argparse.ArgumentParser(prog=prog, add_help=False, usage="%(prog)s --output_dir DIR [--flag value ...]",
                                     description="The common flags (the rest: --help-all):")
    for name in common:
        f = fields.get(name)
        if f is None:
            continue
        if defaults and name in defaults:
            default = defaults[name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = "required" if f.default_factory is dataclasses.MISSING else f.default_factory()
        text = " ".join(str(f.metadata.get("help", "")).split())
        text = text if len(text) < 160 else text[:157].rsplit(" ", 1)[0] + "..."
        parser.add_argument(f"--{name}", metavar="V", help=f"{text} (default: {default})".replace("%", "%%"))
    return parser.format_help() + (f"\n--help-all lists all {total} flags by group (the run's, the method's of --method, "
                                   f"and transformers' TrainingArguments).\n")
