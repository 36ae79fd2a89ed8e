"""``alignkit <command>``: a thin layer that turns flags and YAML into an algorithm's config and calls it.

Every field of an algorithm's config dataclass (and of its nested model/data/train parts) is a flag
(``--max-length``) and a YAML key (``max_length``, flat or under a ``model:``/``data:``/``train:`` section).
Precedence: defaults < ``--config FILE.yaml`` < flags. Every option is checked (``alignkit.config.validate``) before
anything is loaded; an error a user can cause is one line on stderr and exit status 1 (``ALIGNKIT_TRACEBACK=1``
shows the traceback instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

# command -> (module, config class, entry function); each module is imported only when its command runs
ALGORITHMS = {
    "sft": ("alignkit.algos.sft", "SFTConfig", "train", "supervised fine-tuning (completion-only loss)"),
    "rm": ("alignkit.algos.rm", "RMConfig", "train", "reward model (Bradley-Terry pairs, K-way rankings, soft labels)"),
    "dpo": ("alignkit.algos.dpo", "DPOConfig", "train", "DPO and its family: cDPO, IPO, hinge, robust, SimPO, ORPO"),
    "kto": ("alignkit.algos.kto", "KTOConfig", "train", "KTO: alignment from unpaired completions labelled desirable or undesirable"),
    "rrhf": ("alignkit.algos.rrhf", "RRHFConfig", "train", "RRHF: rank K scored responses per prompt, plus SFT on the best"),
    "grpo": ("alignkit.algos.grpo", "GRPOConfig", "train", "GRPO / RLOO / REINFORCE++ (--advantage): critic-free online RL"),
    "rloo": ("alignkit.algos.grpo", "RLOOConfig", "train", "RLOO: leave-one-out baseline, KL in the reward"),
    "ppo": ("alignkit.algos.ppo", "PPOConfig", "train", "PPO with a value head and KL-penalised rewards (InstructGPT recipe)"),
    "raft": ("alignkit.algos.raft", "RAFTConfig", "train",
             "RAFT: sample K per prompt, keep the best by reward (optionally minus beta*KL), SFT on it, repeat"),
    "bon": ("alignkit.algos.bon", "BoNConfig", "run", "best-of-N sampling baseline (no training); KL = log N - (N-1)/N"),
    "curate": ("alignkit.curate", "CurateConfig", "run", "data curation: dedup (exact, MinHash, semantic), quality rules, scoring, core-set selection"),
    "evaluate": ("alignkit.evaluate", "EvalConfig", "run",
                 "score a policy's samples on held-out prompts: reward, KL to the reference, distinct-2, length"),
    "label": ("alignkit.feedback", "LabelConfig", "label",
              "AI feedback: a judge labels pairs of responses (soft labels, both orders) for rm/dpo"),
    "critique": ("alignkit.feedback", "CritiqueConfig", "critique",
                 "Constitutional AI: critique -> revision chains; writes SFT data and revision-over-original pairs"),
    "serve": ("alignkit.serve", "ServeConfig", "run", "OpenAI-compatible HTTP server (completions, chat, logprobs, streaming)"),
}

# commands with their own argument parsers: name -> (module, add-flags function, entry function, one-line help)
TOOLS = {
    "run": ("alignkit.pipeline", "add_run_flags", "run_cli",
            "run a recipe: stages in order, unchanged ones skipped, killed ones resumed"),
    "report": ("alignkit.report", "add_report_flags", "report_cli",
               "HTML report of run directories: curves, reward vs KL, win rates, samples side by side"),
    "quickstart": ("alignkit.pipeline.quickstart", "add_quickstart_flags", "quickstart_cli",
                   "5-minute alignment demo: sample, DPO with LoRA, evaluate before/after, report"),
}


def _fields(cls) -> list[tuple[str, dataclasses.Field, Any, str | None]]:
    """(name, field, resolved type, group) for every leaf field, nested config dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += [(name, sub, t, f.name) for name, sub, t, _ in _fields(kind)]
        else:
            out.append((f.name, f, kind, None))
    return out


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    seen = set()
    for name, f, kind, _group in _fields(cls):
        if name in seen:
            raise TypeError(f"{cls.__name__}: field {name!r} appears twice")
        seen.add(name)
        flag = "--" + name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(), help=help_text)


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SystemExit(f"alignkit: error: config file {path} not found") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"alignkit: error: {path}: invalid YAML ({e})") from None
    if not isinstance(loaded, dict):
        raise SystemExit(f"alignkit: error: {path}: expected a mapping of option: value")
    return loaded


def build_config(cls, flags: dict[str, Any], yaml_values: dict[str, Any] | None = None, source: str = "config"):
    """Config instance from defaults, then YAML values (flat or sectioned), then flags."""
    leaves = {name: (kind, group) for name, _, kind, group in _fields(cls)}
    values: dict[str, Any] = {}
    for key, value in (yaml_values or {}).items():
        if isinstance(value, dict) and key in {g for _, g in leaves.values()}:
            for sub_key, sub_value in value.items():
                values[_yaml_key(sub_key, leaves, source)] = sub_value
        else:
            values[_yaml_key(key, leaves, source)] = value
    values.update(flags)
    for name, value in values.items():
        kind = leaves[name][0]
        if kind is str and isinstance(value, list) and all(isinstance(v, str) for v in value):
            values[name] = value = ",".join(value)  # a YAML list for a comma-list option (e.g. curate's steps)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = value = float(value)
        if kind is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads `lr: 2e-4` as a string: it has no dot. It is a number all the same.
            values[name] = value = float(value)
        elif not isinstance(value, kind):
            raise SystemExit(f"alignkit: error: {source}: {name}: expected {kind.__name__}, got {value!r}")
    groups: dict[str | None, dict[str, Any]] = {}
    for name, value in values.items():
        groups.setdefault(leaves[name][1], {})[name] = value
    hints = typing.get_type_hints(cls)
    top = dict(groups.get(None, {}))
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else hints[f.name]()
            top[f.name] = dataclasses.replace(base, **groups.get(f.name, {}))
    return cls(**top)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _yaml_key(key: str, leaves: dict, source: str) -> str:
    name = key.replace("-", "_")
    if name not in leaves:
        raise SystemExit(f"alignkit: error: {source}: unknown option {key!r}")
    return name


GENERATE_HELP = "sample completions from a model or checkpoint"


def _generate(args: argparse.Namespace) -> None:
    from alignkit.generate import generate_cli

    generate_cli(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="alignkit", description="Align language models with human and AI feedback.")
    commands = parser.add_subparsers(dest="command", required=True)
    # only the command being run gets its flags, so only its module is imported (`alignkit --help` loads no torch)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, cls_name, _, help_text) in ALGORITHMS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            sub.add_argument("--config", help="YAML file of options; flags override it")
            sub.set_defaults(_algo=name)
            add_config_flags(sub, getattr(importlib.import_module(module), cls_name))
    gen = commands.add_parser("generate", help=GENERATE_HELP, description=GENERATE_HELP)
    if chosen == "generate":
        from alignkit.generate import add_generate_flags

        add_generate_flags(gen)
        gen.set_defaults(_run=_generate)
    for name, (module, add_flags, entry, help_text) in TOOLS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            getattr(importlib.import_module(module), add_flags)(sub)
            sub.set_defaults(_run=getattr(importlib.import_module(module), entry))
    args = parser.parse_args(argv)

    from alignkit.config import OptionError, validate
    from alignkit.engine import TrainingDiverged

    flags: dict[str, Any] = {}
    try:
        if getattr(args, "_run", None):
            args._run(args)
            return 0
        module, cls_name, entry, _ = ALGORITHMS[args._algo]
        mod = importlib.import_module(module)
        flags = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "config")}
        yaml_values = _load_yaml(args.config) if args.config else None
        cfg = build_config(getattr(mod, cls_name), flags, yaml_values, source=args.config or "flags")
        validate(cfg)  # every option, before a model is loaded or a file written
        getattr(mod, entry)(cfg)
    except OptionError as e:  # named as the user gave it: a flag, else the YAML key
        given_in_yaml = getattr(args, "config", None) and e.name not in flags
        where = f"{args.config}: {e.name}" if given_in_yaml else "--" + e.name.replace("_", "-")
        return _fail(e.describe(where))
    except (ValueError, OSError, TrainingDiverged) as e:  # DataError is a ValueError; OSError: files, the hub
        if os.environ.get("ALIGNKIT_TRACEBACK"):
            raise
        return _fail(str(e) or type(e).__name__)
    return 0


def _fail(message: str) -> int:
    """One line on stderr (a multi-line message from a library is joined), exit status 1."""
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"alignkit: error: {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
