"""The ``crystallize`` command line: one click group that each tool registers with.

``crystallize run FILE.py[:NAME]`` runs an experiment, prints its summary table,
saves the result and exits non-zero when runs failed (see :mod:`crystallize.run_cli`).
``crystallize cache ...`` manages step caches (see :mod:`crystallize.cache_cli`). Each
tool's module is imported only when its command is used. Installed as the
``crystallize`` console script; ``python -m crystallize`` runs it too.

Example:
    $ crystallize run examples/quickstart.py --replicates 50 --backend process --timeout 600
    $ ray job submit --working-dir . -- crystallize run sweep.py:build --backend ray --resume
    $ crystallize cache ls
    $ python -m crystallize cache du --cache s3://my-bucket/cache
"""

from __future__ import annotations

import importlib

import click

from . import __version__

__all__ = ["main"]

#: Commands that live in their own modules, imported only when used.
_LAZY = {"cache": ("crystallize.cache_cli", "cache"), "run": ("crystallize.run_cli", "run")}


class _Commands(click.Group):
    """A group whose tool commands are imported when first used; one that cannot be is left out."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(n for n in _LAZY if self.get_command(ctx, n))})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _LAZY and name not in self.commands:
            module, attr = _LAZY[name]
            try:
                self.add_command(getattr(importlib.import_module(module), attr), name)
            except ModuleNotFoundError as exc:
                if exc.name != module:  # the tool is there but broken: say so
                    raise
                return None  # a tool this version does not have
        return super().get_command(ctx, name)


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="crystallize")
def main() -> None:
    """crystallize: reproducible experiments from small, cacheable pipeline steps."""
