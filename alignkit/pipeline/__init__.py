"""``alignkit run RECIPE.yaml [stage.key=value ...]``: the whole pipeline as one command.

One door: ``run_recipe(path, overrides)``. A recipe names stages (any command in ``commands.OUTPUTS``), each
reading earlier stages' outputs by name (``data: ${stages.sample.pairs}``, ``model: ${stages.sft.model}``);
RUN/ holds ``recipe.resolved.yaml`` and one directory per stage with its outputs and ``log.txt``. Unchanged
finished stages are skipped (content hash), changed ones re-run with their dependents, killed trainers resume
from their last checkpoint (``runner``). Bundled recipes live in ``alignkit/recipes/`` and are named
``bundled:NAME`` (e.g. ``alignkit run bundled:dpo``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alignkit.pipeline.recipe import Recipe, load
from alignkit.pipeline.runner import StageResult, run

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(name: str) -> Path:
    """A recipe file, or ``bundled:NAME`` for alignkit/recipes/NAME.yaml."""
    if name.startswith("bundled:"):
        path = RECIPES / f"{name.removeprefix('bundled:')}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
            raise ValueError(f"no bundled recipe {name!r}; bundled: {known}")
        return path
    return Path(name)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), run_dir: str | None = None) -> Recipe:
    """The resolved recipe, validated (every stage's config builds), without running anything."""
    from alignkit.pipeline.recipe import check_builds

    recipe = load(recipe_path(str(path)), overrides, run_dir)
    check_builds(recipe)
    return recipe


def run_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), run_dir: str | None = None,
               echo: bool = True) -> list[StageResult]:
    return run(load(recipe_path(str(path)), overrides, run_dir), echo=echo)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file, or bundled:NAME (alignkit/recipes/NAME.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="stage.key=value",
                        help="override a stage option (key=value: a top-level default; run_dir=DIR)")
    parser.add_argument("--run-dir", help="run directory (default: the recipe's run_dir, else runs/RECIPE_NAME)")
    parser.add_argument("--dry-run", action="store_true", help="resolve and validate the recipe, print it, run nothing")


def run_cli(args: argparse.Namespace) -> None:
    if args.dry_run:
        import yaml

        from alignkit.pipeline.recipe import as_dict
        from alignkit.pipeline.runner import hashes_of

        recipe = load_recipe(args.recipe, args.overrides, args.run_dir)
        print(yaml.safe_dump(as_dict(recipe, hashes_of(recipe)), sort_keys=False), end="")
        return
    run_recipe(args.recipe, args.overrides, args.run_dir)


__all__ = ["Recipe", "StageResult", "load_recipe", "recipe_path", "run_recipe"]
