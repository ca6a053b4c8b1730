"""The `codepmp` command: a thin click layer over `pipelines` (all logic is importable and tested there).

User mistakes (bad spec, missing file, unknown stage) print one `error:` line and exit 2; a run that
cannot proceed exits 1. Tracebacks are for bugs only.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from pipelines.spec import Spec
from pipelines.stages import NAMES, declared_names, load
from sdk.errors import CodepmpError

SPEC_HELP = "Path to a spec YAML file (see specs/ for examples)."
SET_HELP = "Override a spec field before validation, e.g. --set generate.strong.sampling.temperature=0.2 (repeatable)."


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one clear line on stderr and the error's exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CodepmpError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


def spec_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(func)
    return click.argument("spec", type=click.Path(dir_okay=False))(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="codepmp")
def cli() -> None:
    """codepmp: pretrain reward models on preference pairs synthesized from code (CodePMP).

    Start with `codepmp plan specs/local_demo.yaml`, then `codepmp run specs/local_demo.yaml`.
    """
    show_progress()


def show_progress() -> None:
    """Print the `pipelines` logger's INFO messages (stage progress) as plain lines on stdout.

    The library only logs; the command decides where it goes. Not propagated, so a root handler some
    dependency installs cannot print every line twice.
    """
    logger = logging.getLogger("pipelines")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@cli.command()
@spec_options
@user_errors
def validate(spec: str, overrides: tuple[str, ...]) -> None:
    """Check a spec: exit 0 if valid, else print the offending field and exit 2."""
    loaded = load(spec, overrides)
    click.echo(f"ok: {spec} is valid; stages: {', '.join(declared_names(loaded)) or 'none'}")


@cli.command()
@spec_options
@click.option("--workdir", type=click.Path(file_okay=False), help="Run directory (default: spec's workdir).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@user_errors
def plan(spec: str, overrides: tuple[str, ...], workdir: str | None, as_json: bool) -> None:
    """Show the stage graph, each stage's inputs/outputs and a size/cost estimate (tokens, GPU-hours)."""
    from pipelines.plan import build_plan, plan_as_dict, render_plan
    from pipelines.runner import resolve_workdir

    loaded = load(spec, overrides)
    root = resolve_workdir(loaded, workdir)
    plans = build_plan(loaded, root)
    if as_json:
        click.echo(json.dumps(plan_as_dict(loaded, root, plans), indent=2))
    else:
        click.echo(render_plan(loaded, root, plans))


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the spec (point your editor's YAML plugin at it)."""
    click.echo(json.dumps(Spec.model_json_schema(), indent=2))


@cli.command()
@spec_options
@click.option(
    "--workdir", type=click.Path(file_okay=False), help="Run directory (default: spec's workdir, else ./runs/NAME)."
)
@click.option("--only", type=click.Choice(NAMES), help="Run just this stage (its inputs must be done).")
@click.option("--until", type=click.Choice(NAMES), help="Run the declared stages up to and including this one.")
@click.option("--force", is_flag=True, help="Rerun the selected stages from scratch even if they are done.")
@user_errors
def run(
    spec: str, overrides: tuple[str, ...], workdir: str | None, only: str | None, until: str | None, force: bool
) -> None:
    """Run a spec's stages in order: curate, describe, generate, pairs, pretrain, finetune, evaluate.

    Finished stages are skipped on rerun (same spec section); an interrupted stage resumes; a stage
    whose section changed reruns together with the stages after it. Outputs go to the workdir.
    """
    from pipelines.runner import resolve_workdir, run_spec

    loaded = load(spec, overrides)
    run_spec(loaded, resolve_workdir(loaded, workdir), only=only, until=until, force=force)


def main() -> None:
    cli(prog_name="codepmp")


if __name__ == "__main__":
    main()
