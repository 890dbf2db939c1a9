"""``python -m crystallize``: the ``crystallize`` command line (see :mod:`crystallize.cli`)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="crystallize")
