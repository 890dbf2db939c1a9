"""``crystallize run FILE.py[:NAME]``: run an experiment from its file, as a batch job would.

It finds the experiment (an ``Experiment`` in the file, or a function returning one),
applies the command line (backend, replicates, ``--set`` overrides of ``initial_ctx``,
timeout, journal), runs it with progress on, prints the summary table, saves the
result, and exits 1 when runs failed: the entrypoint for a laptop, a cluster batch job
and ``ray job submit`` alike. Registered on the ``crystallize`` group by
:mod:`crystallize.cli`.

Exit codes: 0 every run succeeded (or ``--allow-failures``), 1 runs failed, 2 the
command or the experiment is wrong (nothing ran), 130 Ctrl-C (the finished runs are
saved and journaled; ``--resume`` continues).

Example:
    $ crystallize run examples/quickstart.py --replicates 50 --backend process --timeout 600
    $ ray job submit --working-dir . -- crystallize run sweep.py:build --backend ray --resume
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click

__all__ = ["BACKENDS", "load_experiment", "parse_setting", "run"]

BACKENDS = ("serial", "thread", "process", "async", "ray")


@click.command(
    "run",
    epilog="Exit codes: 0 all runs succeeded (or --allow-failures); 1 runs failed; "
    "2 the command or the experiment is wrong, nothing ran; 130 Ctrl-C (finished "
    "runs are saved and journaled: run again with --resume).",
)
@click.argument("target", metavar="FILE.py[:NAME]")
@click.option(
    "-n",
    "--replicates",
    type=click.IntRange(min=1),
    default=None,
    help="Replicates per condition. Default: the experiment's own.",
)
@click.option(
    "-b",
    "--backend",
    type=click.Choice(BACKENDS),
    default=None,
    help="Where runs execute. Default: the experiment's own backend (serial if it has none); "
    "ray when --address is given.",
)
@click.option(
    "-w",
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker threads or processes (thread, process), or concurrent runs (async). "
    "Default: the backend's (the CPU count; 64 for async).",
)
@click.option(
    "--address",
    default=None,
    metavar="ADDRESS",
    help="The Ray cluster to join, e.g. auto or ray://head:10001 (implies --backend ray). "
    "Default: $RAY_ADDRESS (set inside `ray job submit`), else a local Ray.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Reuse the successful runs in this experiment's journal and run only the others. "
    "A journal of a changed experiment is not used (a warning says what changed).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Stop a run that takes longer and record it as a TimeoutError naming its step "
    "(process, async and ray backends).",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder to save the result in (Result.load reads it back). Default: results/<experiment>-<UTC time>.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Also draw the result to this image (.png, .svg, .pdf); needs "
    "'crystallize-lab[plot]'. A plot that fails is a warning, not a failure.",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Report progress: a redrawn line on a terminal, timestamped lines in a log "
    "(every $CRYSTALLIZE_PROGRESS_EVERY seconds, default 10).",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override an initial_ctx value (repeatable). VALUE is read as JSON, else as a "
    "Python literal, else as a string: --set lr=0.1 --set layers=[64,64] --set name=big.",
)
@click.option(
    "--journal",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Directory of run journals. Default: $CRYSTALLIZE_HOME/journals, else ./.crystallize/journals.",
)
@click.option("--no-journal", is_flag=True, help="Keep no journal (a run that dies cannot be resumed).")
@click.option("--allow-failures", is_flag=True, help="Exit 0 even when runs failed.")
def run(
    target: str,
    replicates: int | None,
    backend: str | None,
    workers: int | None,
    address: str | None,
    resume: bool,
    timeout: float | None,
    out: Path | None,
    plot: Path | None,
    progress: bool,
    settings: tuple[str, ...],
    journal: Path | None,
    no_journal: bool,
    allow_failures: bool,
) -> None:
    """Run the experiment in FILE.py, print its summary, save the result.

    FILE.py[:NAME] names an Experiment in the file, or a function that takes no
    arguments and returns one (e.g. examples/quickstart.py:build). Without NAME the
    file's only Experiment is used, else its only function annotated to return one.
    The file runs as a module (its `if __name__ == "__main__":` block does not); its
    folder is put first on sys.path so it can import its neighbours.

    Every finished run is journaled as it arrives, so a job that dies can be rerun
    with --resume and only the missing runs execute.

    \b
    Examples:
      crystallize run sweep.py --replicates 30 --backend process --workers 8
      crystallize run sweep.py:build --set lr=0.05 --timeout 600 --out results/lr
      ray job submit --working-dir . -- crystallize run sweep.py --backend ray --resume
    """
    _log_to_stderr()
    if no_journal and journal is not None:
        raise click.UsageError("--journal and --no-journal contradict each other; give one.")
    from .errors import CrystallizeError

    experiment = load_experiment(target)
    job = copy.copy(experiment)  # the file's experiment stays as it was
    job.initial_ctx = {**experiment.initial_ctx, **dict(parse_setting(text) for text in settings)}
    job.plugins = [p for p in experiment.plugins if not _is_backend(p)]
    job.plugins.append(
        _backend(
            backend or ("ray" if address else None),
            experiment,
            workers=workers,
            address=address,
            timeout=timeout,
            progress=progress,
        )
    )
    job.journal = False if no_journal else (journal if journal is not None else experiment.journal)
    try:
        result = job.run(replicates=replicates, resume=resume)
    except KeyboardInterrupt as exc:
        partial = getattr(exc, "partial_result", None)
        if partial is not None:
            click.echo(partial.summary())
            _save(partial, out, job.name)
        click.echo(
            "Interrupted: the finished runs are journaled; run the same command with --resume to continue.", err=True
        )
        sys.exit(130)
    except CrystallizeError as exc:
        raise click.UsageError(f"{type(exc).__name__}: {exc}") from exc
    click.echo(result.summary())
    _save(result, out, job.name)
    if plot is not None:
        try:
            result.plot(path=plot)
            click.echo(f"Plot: {plot}", err=True)
        except Exception as exc:  # a picture never costs the job
            click.echo(
                f"Warning: the plot could not be drawn ({type(exc).__name__}: {exc}); the result is saved.", err=True
            )
    if result.errors and not allow_failures:
        from .errors import RunsFailedError

        click.echo(str(RunsFailedError(result)), err=True)
        sys.exit(1)


def parse_setting(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` as ``(key, value)``: VALUE is JSON, else a Python literal, else a string.

    Example:
        >>> [parse_setting(t) for t in ("lr=0.1", "layers=[64, 64]", "ok=True", "name=big", "tag='7'")]
        [('lr', 0.1), ('layers', [64, 64]), ('ok', True), ('name', 'big'), ('tag', '7')]
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{text!r} is not KEY=VALUE; write e.g. --set lr=0.1", param_hint="--set")
    try:
        return key.strip(), json.loads(raw)
    except ValueError:
        pass
    try:
        return key.strip(), ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key.strip(), raw


def load_experiment(target: str) -> Any:
    """The Experiment that ``FILE.py[:NAME]`` names (see ``crystallize run --help``).

    Raises:
        click.UsageError: the file is missing, raised while loading, or holds no such
            experiment (the message lists what it does hold).
    """
    from .experiment import Experiment

    path, name = Path(target), None
    if not path.exists() and ":" in target:
        where, name = target.rsplit(":", 1)
        path = Path(where)
    if not path.is_file():
        raise click.UsageError(
            f"{str(path)!r} is not a file; give the experiment's Python file, "
            f"e.g. crystallize run sweep.py or sweep.py:build."
        )
    module = _import_file(path.resolve())
    if name:
        if not hasattr(module, name):
            raise click.UsageError(f"{path} has no {name!r}; it defines {_candidates(module, Experiment)}.")
        return _as_experiment(getattr(module, name), f"{path}:{name}", Experiment)
    found = {id(v): (n, v) for n, v in vars(module).items() if isinstance(v, Experiment)}
    if len(found) == 1:
        return next(iter(found.values()))[1]
    if not found:
        makers = [(n, v) for n, v in vars(module).items() if _returns_experiment(v, module, Experiment)]
        if len(makers) == 1:
            return _as_experiment(makers[0][1], f"{path}:{makers[0][0]}", Experiment)
    raise click.UsageError(
        f"{path} holds {_candidates(module, Experiment)}: say which, as "
        f"{path}:NAME (an Experiment, or a function returning one)."
    )


def _import_file(path: Path) -> Any:
    stem = path.stem if path.stem.isidentifier() else "experiment_file"
    name = stem if stem not in sys.modules and importlib.util.find_spec(stem) is None else f"crystallize_run_{stem}"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        traceback.print_exc()
        raise click.UsageError(
            f"{path} raised {type(exc).__name__} while it was loaded (traceback above): {exc}"
        ) from exc
    import cloudpickle  # type: ignore[import-untyped]

    # Workers (spawned processes, Ray) cannot import a file by path: its code travels by value.
    cloudpickle.register_pickle_by_value(module)
    return module


def _as_experiment(obj: Any, where: str, experiment_type: type) -> Any:
    if isinstance(obj, experiment_type):
        return obj
    if callable(obj):
        try:
            made = obj()
        except TypeError as exc:
            raise click.UsageError(f"{where} must take no arguments to build the experiment: {exc}") from exc
        if isinstance(made, experiment_type):
            return made
        raise click.UsageError(f"{where}() returned a {type(made).__name__}, not an Experiment.")
    raise click.UsageError(f"{where} is a {type(obj).__name__}, not an Experiment or a function returning one.")


def _returns_experiment(value: Any, module: Any, experiment_type: type) -> bool:
    if not callable(value) or getattr(value, "__module__", None) != module.__name__ or isinstance(value, type):
        return False
    annotation = getattr(value, "__annotations__", {}).get("return")
    return annotation is experiment_type or annotation in ("Experiment", "crystallize.Experiment")


def _candidates(module: Any, experiment_type: type) -> str:
    names = [n for n, v in vars(module).items() if isinstance(v, experiment_type)]
    names += [f"{n}()" for n, v in vars(module).items() if _returns_experiment(v, module, experiment_type)]
    return "Experiments " + ", ".join(names) if names else "no Experiment and no function annotated -> Experiment"


def _is_backend(plugin: Any) -> bool:
    from .backend import ExecutionBackend

    return isinstance(plugin, ExecutionBackend)


def _backend(
    kind: str | None,
    experiment: Any,
    *,
    workers: int | None,
    address: str | None,
    timeout: float | None,
    progress: bool,
) -> Any:
    """The backend ``--backend`` and its options ask for (the experiment's own by default)."""
    from .errors import ConfigurationError
    from .execution import AsyncExecution, SerialExecution
    from .parallel import ParallelExecution

    where = f"--backend {kind}" if kind else f"the experiment's {type(experiment.backend).__name__}"
    try:
        if kind is None:
            backend = copy.copy(experiment.backend)
            if timeout is not None:
                if not backend.supports_timeout:
                    raise click.UsageError(
                        f"--timeout: {where} cannot stop a run; give --backend process, async or ray."
                    )
                backend.timeout = timeout
        elif kind == "serial":
            backend = SerialExecution(timeout=timeout)
        elif kind in ("thread", "process"):
            backend = ParallelExecution(max_workers=workers, executor_type=kind, timeout=timeout)
        elif kind == "async":
            backend = AsyncExecution(max_concurrency=workers or 64, timeout=timeout)
        else:
            backend = _ray(address, workers, timeout)
    except ConfigurationError as exc:
        raise click.UsageError(f"{where}: {exc}") from exc
    backend.progress = progress
    return backend


def _ray(address: str | None, workers: int | None, timeout: float | None) -> Any:
    try:
        from crystallize_ray import RayExecution
    except ImportError as exc:
        raise click.UsageError(f"--backend ray needs Ray: pip install 'crystallize-lab[ray]' ({exc}).") from exc
    if workers:
        raise click.UsageError(
            "--workers does not apply to --backend ray: Ray runs as many runs at once as the cluster has CPUs for."
        )
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if address:
        options["address"] = address
    try:
        return RayExecution(**options)
    except TypeError as exc:  # an older RayExecution without timeout=
        raise click.UsageError(f"--backend ray: {exc}; this crystallize_ray cannot enforce --timeout.") from exc


def _save(result: Any, out: Path | None, name: str) -> None:
    from .artifacts import path_part

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = out if out is not None else Path("results") / f"{path_part(str(name))}-{stamp}"
    try:
        click.echo(f"Saved: {result.save(folder)}", err=True)
    except Exception as exc:
        click.echo(f"Warning: the result could not be saved to {folder} ({type(exc).__name__}: {exc}).", err=True)


def _log_to_stderr() -> None:
    """crystallize's INFO lines (resumed runs, warnings) on stderr, unless logging is set up already."""
    root = logging.getLogger()
    package = logging.getLogger("crystallize")
    if not root.handlers and not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
