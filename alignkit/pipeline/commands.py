"""What the pipeline knows about each command: where it writes (so a stage can be pointed at RUN/<stage>/) and
the named outputs later stages may reference as ``${stages.NAME.OUTPUT}``.

A new command plugs in with one entry here (and its usual entry in ``alignkit.cli.ALGORITHMS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Outputs:
    target: str  # the config field the pipeline sets to RUN/<stage>/<target_file>
    target_file: str = ""  # "" : the field takes the stage directory itself
    files: dict[str, str] = field(default_factory=dict)  # output name -> path inside the stage directory ("" = it)
    checkpoints: bool = False  # a trainer: resumable from RUN/<stage>/checkpoint-N with --resume
    reads_run: str = ""  # a field that defaults to the whole run directory (the stage reads every earlier stage)


_TRAINER = Outputs("output_dir", files={"model": "", "dir": "", "metrics": "metrics.jsonl"}, checkpoints=True)

OUTPUTS: dict[str, Outputs] = {
    **{name: _TRAINER for name in ("sft", "rm", "dpo", "kto", "rrhf", "ppo", "grpo", "rloo", "raft")},
    "bon": Outputs("output_dir", files={"bon": "bon.jsonl", "pairs": "pairs.jsonl", "summary": "summary.json",
                                        "dir": ""}),
    "evaluate": Outputs("output", "eval.json", files={"metrics": "eval.json", "samples": "eval.samples.jsonl",
                                                       "verdicts": "eval.verdicts.jsonl", "dir": ""}),
    "report": Outputs("output", "report.html", files={"html": "report.html", "dir": ""}, reads_run="runs"),
    # landing with their branches (outputs as their briefs define them):
    "curate": Outputs("output_dir", files={"curated": "curated.jsonl", "manifest": "manifest.jsonl",
                                           "summary": "summary.json", "dir": ""}),
    "label": Outputs("output_dir", files={"pairs": "pairs.jsonl", "summary": "summary.json", "dir": ""}),
    "critique": Outputs("output_dir", files={"sft": "sft.jsonl", "pairs": "pairs.jsonl", "chains": "chains.jsonl",
                                             "dir": ""}),
}

# commands that are not in cli.ALGORITHMS (they have their own argument parsers) but run as stages
EXTRA_COMMANDS = {
    "report": ("alignkit.report", "ReportConfig", "run"),
}


def command_spec(command: str) -> tuple[str, str, str] | None:
    """(module, config class, entry function) of a command that can be a stage, else None."""
    from alignkit.cli import ALGORITHMS

    if command in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[command]
    if command in ALGORITHMS and command in OUTPUTS:
        return ALGORITHMS[command][:3]
    return None


def stage_commands() -> list[str]:
    from alignkit.cli import ALGORITHMS

    return [c for c in OUTPUTS if c in ALGORITHMS or c in EXTRA_COMMANDS]
