"""Code fingerprints across processes: edit a real file, run a fresh interpreter.

Each test writes a small project (the step's module and its sibling modules) into a
temporary directory, prints ``code_fingerprint`` of one object from a new Python
process, edits one file, and prints it again, as a user re-running a script would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DRIVER = """\
import importlib
import sys

sys.path.insert(0, sys.argv[1])
from crystallize.fingerprint import code_fingerprint

module = importlib.import_module(sys.argv[2])
print(code_fingerprint(getattr(module, sys.argv[3])))
"""


class Project:
    """Module files on disk, fingerprinted by a fresh interpreter after each edit."""

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        self.src = root / "src"
        self.src.mkdir()
        self.driver = root / "driver.py"
        self.driver.write_text(DRIVER)
        for name, text in files.items():
            self.write(name, text)

    def write(self, name: str, text: str) -> None:
        (self.src / f"{name}.py").write_text(textwrap.dedent(text))

    def edit(self, name: str, old: str, new: str) -> None:
        path = self.src / f"{name}.py"
        text = path.read_text()
        assert old in text, f"{old!r} is not in {name}.py"
        path.write_text(text.replace(old, new))

    def fingerprint(self, module: str, attr: str, seed: str = "0") -> str:
        env = dict(
            os.environ,
            PYTHONHASHSEED=seed,
            # An edit within the same second must not be served a stale .pyc.
            PYTHONDONTWRITEBYTECODE="1",
        )
        done = subprocess.run(
            [sys.executable, str(self.driver), str(self.src), module, attr],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


EXPERIMENT = """\
import dataclasses
import functools

import numpy as np

import helpers
from decorators import doubled, plain_wrapper
from helpers import scale
from bases import Base

@dataclasses.dataclass(frozen=True)
class Config:
    lr: float

CONFIG = Config(lr=0.1)


def unused():
    return "never reached"


def step(data):
    return [helpers.transform(scale(x)) * CONFIG.lr + np.sign(x) for x in data]


@doubled
def decorated(data):
    return data


@plain_wrapper
def decorated_plain(data):
    return data


def step_with_default(data, *, fn=helpers.clip):
    return [fn(x) for x in data]


class ClassStep(Base):
    def __call__(self, data, ctx):
        return self.prepare(data)
"""

HELPERS = """\
def transform(x):
    return x + 1


def scale(x):
    return x * 2


def clip(x):
    return min(x, 10)


def elsewhere():
    return "not used by any step"
"""

DECORATORS = """\
import functools


def doubled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) * 2
    return wrapper


def plain_wrapper(fn):
    def inner(*args, **kwargs):
        return fn(*args, **kwargs)
    return inner
"""

BASES = """\
from crystallize import PipelineStep


class Base(PipelineStep):
    cacheable = True

    def prepare(self, data):
        return sorted(data)
"""


@pytest.fixture
def project(tmp_path):
    return Project(
        tmp_path,
        {"exp": EXPERIMENT, "helpers": HELPERS, "decorators": DECORATORS, "bases": BASES},
    )


def test_unchanged_code_gives_one_digest_in_every_process(project):
    first = project.fingerprint("exp", "step", seed="0")
    assert project.fingerprint("exp", "step", seed="1") == first
    assert project.fingerprint("exp", "step", seed="12345") == first
    assert project.fingerprint("exp", "ClassStep", seed="1") == project.fingerprint("exp", "ClassStep", seed="2")


def test_editing_code_the_step_never_reaches_changes_nothing(project):
    before = project.fingerprint("exp", "step")
    project.edit("helpers", '"not used by any step"', '"still not used"')
    project.edit("exp", '"never reached"', '"still never reached"')
    assert project.fingerprint("exp", "step") == before


@pytest.mark.parametrize(
    "attr, module, old, new",
    [
        # A helper in a sibling module, called as helpers.transform(...).
        ("step", "helpers", "return x + 1", "return x + 2"),
        # A helper imported by name: from helpers import scale.
        ("step", "helpers", "return x * 2", "return x * 3"),
        # The value of a dataclass constant.
        ("step", "exp", "Config(lr=0.1)", "Config(lr=0.2)"),
        # A decorator's wrapper (functools.wraps) and one without wraps.
        ("decorated", "decorators", "* 2", "* 3"),
        ("decorated_plain", "decorators", "return fn(*args, **kwargs)", "return fn(*args, **kwargs) or []"),
        # The decorated function itself, behind the wrapper.
        ("decorated", "exp", "def decorated(data):\n    return data", "def decorated(data):\n    return data[:]"),
        # A helper given as a default argument.
        ("step_with_default", "helpers", "min(x, 10)", "min(x, 11)"),
        # A base class method.
        ("ClassStep", "bases", "return sorted(data)", "return sorted(data, reverse=True)"),
        # A base class attribute.
        ("ClassStep", "bases", "cacheable = True", "cacheable = True\n    window = 3"),
    ],
    ids=[
        "sibling-module-helper",
        "imported-helper",
        "dataclass-constant",
        "decorator-wraps",
        "decorator-plain",
        "decorated-function",
        "default-arg-helper",
        "base-class-method",
        "base-class-attribute",
    ],
)
def test_an_edit_the_step_reaches_changes_its_fingerprint(project, attr, module, old, new):
    before = project.fingerprint("exp", attr)
    project.edit(module, old, new)
    assert project.fingerprint("exp", attr) != before
