"""A recipe: top-level defaults and an ordered ``stages:`` mapping, resolved into stages ready to run.

    model: smollm2-135m          # a default: every stage whose command has a ``model`` option gets it
    run_dir: runs/my-run         # where RUN/<stage>/ directories go (``--run-dir`` overrides)
    stages:
      sample:                    # stage name; ``command`` defaults to it
        command: bon
        data: bundled:movie_prompts_train
      dpo:
        data: ${stages.sample.pairs}     # a named output of an earlier stage (commands.OUTPUTS)
        lora: true
        train: {lr: 2.0e-4}               # options flat or under model:/data:/train:/rollout: sections

Top-level keys starting with ``x-`` are ignored: a place for YAML anchors that stages share (``<<: *dpo``).
Overrides ``stage.key=value`` (``key=value`` for a default, ``run_dir=DIR``) are parsed as YAML values. Every
mistake (unknown stage, option, reference, bad value) is one ValueError naming the recipe file and the stage/key.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.cli import _parse_bool
from alignkit.pipeline.commands import OUTPUTS, command_spec, stage_commands

RESERVED = ("stages", "run_dir", "description")
REFERENCE = re.compile(r"\$\{([^}]*)\}")
STAGE_REF = re.compile(r"stages\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)")
NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Stage:
    name: str
    command: str
    options: dict[str, Any]  # leaf option -> value as written (references still as ${...}), defaults applied
    resolved: dict[str, Any]  # leaf option -> value with references replaced by paths (without pipeline-set fields)
    needs: list[str]  # earlier stages this one reads (by reference, or all of them for a report)
    dir: Path


@dataclass
class Recipe:
    source: str  # the recipe file, for messages
    run_dir: Path
    stages: list[Stage]
    description: str = ""


def leaves(command: str) -> dict[str, tuple[type, str | None]]:
    """option name -> (type, section) of a command's config class."""
    from alignkit.cli import _fields

    module, cls_name, _ = command_spec(command)
    return {name: (kind, group) for name, _, kind, group in _fields(getattr(importlib.import_module(module), cls_name))}


def config_class(command: str):
    module, cls_name, _ = command_spec(command)
    return getattr(importlib.import_module(module), cls_name)


class Raw(str):
    """An override's value as typed on the command line; it takes the type of the option it sets."""


def _coerce(value: Any, kind: type, where: str) -> Any:
    """YAML 1.1 reads ``2e-4`` as a string and users write ``lr: 1`` for floats: convert to the option's type."""
    if isinstance(value, Raw):
        if kind is str:
            return str(value)
        if kind is bool:
            try:
                return _parse_bool(value)
            except Exception:
                raise ValueError(f"{where}: expected true or false, got {str(value)!r}") from None
        value = str(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and kind in (int, float) and not REFERENCE.search(value):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    if kind is str and isinstance(value, bool):
        raise ValueError(f"{where}: expected a string, got {value!r} (YAML reads yes/no/on/off as booleans: quote it)")
    if not isinstance(value, kind) and not (kind is str and isinstance(value, (int, float))):
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    return str(value) if kind is str else value


def _flatten(options: Any, command: str, where: str) -> dict[str, Any]:
    """Flat leaf options from a stage body (flat keys or model:/data:/train:/... sections), validated by name."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"{where}: expected a mapping of option: value, got {options!r}")
    known = leaves(command)
    sections = {g for _, g in known.values() if g}
    flat: dict[str, Any] = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name in sections and isinstance(value, dict):
            for sub, sub_value in _flatten_section(value, f"{where}.{key}").items():
                flat[sub] = sub_value
        else:
            flat[name] = value
    for name, value in flat.items():
        if name not in known:
            raise ValueError(f"{where}: unknown option {name!r} for command {command!r} (see alignkit {command} --help)")
        flat[name] = _coerce(value, known[name][0], f"{where}.{name}")
    return flat


def _flatten_section(section: dict, where: str) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in section.items()}


def parse_override(text: str, source: str) -> tuple[list[str], Raw]:
    """``stage.key=value`` -> (["stage", "key"], the value text, typed later by the option it sets)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not all(NAME.fullmatch(part) for part in key.split(".")):
        raise ValueError(f"{source}: override {text!r}: expected stage.key=value (or key=value for a default)")
    return key.split("."), Raw(raw)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), run_dir: str | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe (nothing runs)."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"recipe {source} not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict) or not raw["stages"]:
        raise ValueError(f"{source}: expected a mapping with a non-empty 'stages:' mapping of name: options")
    stages_raw: dict[str, Any] = {}
    for name, body in raw["stages"].items():
        if not NAME.fullmatch(str(name)):
            raise ValueError(f"{source}: stage name {name!r}: use letters, digits, '_' and '-'")
        if body is not None and not isinstance(body, dict):
            raise ValueError(f"{source}: stages.{name}: expected a mapping of option: value, got {body!r}")
        stages_raw[str(name)] = dict(body or {})
    defaults = {str(k).replace("-", "_"): v for k, v in raw.items() if k not in RESERVED and not str(k).startswith("x-")}
    run = raw.get("run_dir", "runs/" + Path(path).stem)

    for text in overrides:
        keys, value = parse_override(text, source)
        if keys == ["run_dir"]:
            run = value
        elif len(keys) == 1:
            defaults[keys[0].replace("-", "_")] = value
        elif keys[0] not in stages_raw:
            raise ValueError(f"{source}: override {text!r}: no stage {keys[0]!r} (stages: {', '.join(stages_raw)})")
        else:
            body = stages_raw[keys[0]]
            if len(keys) == 2:
                body[keys[1]] = value
            else:  # stage.section.key
                body.setdefault(keys[1], {})
                if not isinstance(body[keys[1]], dict):
                    raise ValueError(f"{source}: override {text!r}: {keys[0]}.{keys[1]} is not a section")
                body[keys[1]][".".join(keys[2:])] = value
    run_dir = Path(run_dir or run).resolve()

    stages: list[Stage] = []
    used_defaults: set[str] = set()
    for name, body in stages_raw.items():
        where = f"{source}: stages.{name}"
        command = str(body.pop("command", name))
        if command_spec(command) is None:
            raise ValueError(f"{where}: unknown command {command!r} (one of: {', '.join(stage_commands())}); "
                             "set 'command:' when the stage name is not a command")
        options = _flatten(body, command, where)
        outputs = OUTPUTS[command]
        for own in (outputs.target, "resume"):
            if own in options:
                raise ValueError(f"{where}.{own}: set by the pipeline (the stage writes to its own directory "
                                 f"{run_dir / name}; a killed stage resumes by itself)")
        known = leaves(command)
        for key, value in defaults.items():
            if key in known and key not in options and key not in (outputs.target, "resume"):
                options[key] = _coerce(value, known[key][0], f"{source}: {key} (default for stages.{name})")
                used_defaults.add(key)
        stages.append(Stage(name, command, options, {}, [], run_dir / name))
    unused = set(defaults) - used_defaults
    if unused:
        raise ValueError(f"{source}: top-level option {sorted(unused)[0]!r} is an option of no stage's command")

    for i, stage in enumerate(stages):
        earlier = {s.name: s for s in stages[:i]}
        for key, value in stage.options.items():
            stage.resolved[key] = _substitute(value, earlier, stage, f"{source}: stages.{stage.name}.{key}", run_dir)
        outputs = OUTPUTS[stage.command]
        if outputs.reads_run:
            if not stage.resolved.get(outputs.reads_run):
                stage.resolved[outputs.reads_run] = str(run_dir)
                stage.needs = [s.name for s in stages[:i]]
    return Recipe(source, run_dir, stages, str(raw.get("description", "")))


def _substitute(value: Any, earlier: dict[str, Stage], stage: Stage, where: str, run_dir: Path) -> Any:
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        inner = match.group(1).strip()
        if inner == "run_dir":
            return str(run_dir)
        ref = STAGE_REF.fullmatch(inner)
        if ref is None:
            raise ValueError(f"{where}: unknown reference ${{{inner}}} (expected ${{stages.NAME.OUTPUT}} or ${{run_dir}})")
        name, output = ref.groups()
        if name not in earlier:
            raise ValueError(f"{where}: ${{{inner}}}: no earlier stage {name!r} (a stage reads only stages before "
                             f"it: {', '.join(earlier) or 'none'})")
        files = OUTPUTS[earlier[name].command].files
        if output not in files:
            raise ValueError(f"{where}: ${{{inner}}}: stage {name!r} ({earlier[name].command}) has no output "
                             f"{output!r}; it has: {', '.join(files)}")
        if name not in stage.needs:
            stage.needs.append(name)
        path = earlier[name].dir / files[output] if files[output] else earlier[name].dir
        return str(path)

    return REFERENCE.sub(replace, value)


def as_dict(recipe: Recipe, hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved recipe (RUN/recipe.resolved.yaml): every option of every stage, references as paths."""
    stages = {}
    for stage in recipe.stages:
        body: dict[str, Any] = {"command": stage.command, **stage.resolved}
        if stage.needs:
            body["needs"] = list(stage.needs)
        if hashes:
            body["hash"] = hashes[stage.name]
        stages[stage.name] = body
    out = {"source": recipe.source, "run_dir": str(recipe.run_dir), "stages": stages}
    if recipe.description:
        out["description"] = recipe.description
    return out


def full_config(stage: Stage, source: str, resume: bool = False):
    """The stage's command config: recipe options, its output pointed at RUN/<stage>/, ``resume`` for trainers."""
    from alignkit.cli import build_config

    outputs = OUTPUTS[stage.command]
    values = dict(stage.resolved)
    values[outputs.target] = str(stage.dir / outputs.target_file) if outputs.target_file else str(stage.dir)
    if outputs.checkpoints:
        values["resume"] = resume
    try:
        return build_config(config_class(stage.command), values, None, source=f"{source}: stages.{stage.name}")
    except SystemExit as e:  # build_config's one-line messages, as a ValueError the pipeline can name
        raise ValueError(str(e).removeprefix("alignkit: error: ")) from None


def validated(stage: Stage, config, source: str, pending: bool = False):
    """``config`` after ``alignkit.config.validate`` (ranges, choices, model and data locations), errors named by
    recipe, stage and option. ``pending``: before the run, an option that reads an earlier stage's output (not
    written yet) is checked when its stage starts."""
    from alignkit.config import OptionError, validate

    try:
        validate(config)
    except OptionError as e:
        if pending and "${" in str(stage.options.get(e.name, "")):
            return config
        raise ValueError(e.describe(f"{source}: stages.{stage.name}.{e.name}")) from None
    except ValueError as e:  # a config's cross-option check()
        raise ValueError(f"{source}: stages.{stage.name}: {e}") from None
    return config


def check_builds(recipe: Recipe) -> None:
    """Every stage's config builds and validates (types, names, values), before anything runs."""
    for stage in recipe.stages:
        validated(stage, full_config(stage, recipe.source), recipe.source, pending=True)
