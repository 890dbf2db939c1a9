"""FrozenContext: write-once keys, values that cannot be edited from outside, metrics."""

from __future__ import annotations

import logging
from types import MappingProxyType

import numpy as np
import pytest

from crystallize import ContextMetrics, ContextMutationError, CrystallizeError, FrozenContext

# -- reading --------------------------------------------------------------------------


def test_get_item_and_default():
    ctx = FrozenContext({"factor": 2, "name": "run"})
    assert ctx.get("factor") == 2
    assert ctx["name"] == "run"
    assert ctx.get("absent") is None
    assert ctx.get("absent", 7) == 7
    with pytest.raises(KeyError, match="absent"):
        ctx["absent"]


def test_a_stored_none_is_not_the_default():
    ctx = FrozenContext({"maybe": None})
    assert ctx.get("maybe", "default") is None
    assert "maybe" in ctx


def test_empty_context():
    ctx = FrozenContext()
    assert len(ctx) == 0
    assert ctx.keys() == []
    assert "x" not in ctx


def test_add_new_keys():
    ctx = FrozenContext({"a": 1})
    ctx.add("b", 2)
    ctx.add("c", [3])
    assert ctx["b"] == 2
    assert ctx.get("c") == [3]
    assert "b" in ctx and "z" not in ctx
    assert ctx.keys() == ["a", "b", "c"]
    assert list(ctx) == ["a", "b", "c"]
    assert len(ctx) == 3


# -- write once -----------------------------------------------------------------------


def test_adding_an_existing_key_raises_naming_it():
    ctx = FrozenContext({"factor": 2})
    with pytest.raises(ContextMutationError, match="'factor'") as info:
        ctx.add("factor", 3)
    assert info.value.key == "factor"
    assert isinstance(info.value, CrystallizeError)
    assert ctx["factor"] == 2


def test_adding_the_same_key_twice_raises():
    ctx = FrozenContext()
    ctx.add("seed", 1)
    with pytest.raises(ContextMutationError, match="'seed'"):
        ctx.add("seed", 1)


def test_item_assignment_to_an_existing_key_raises():
    ctx = FrozenContext({"factor": 2})
    with pytest.raises(ContextMutationError, match="'factor'"):
        ctx["factor"] = 5
    assert ctx["factor"] == 2


def test_item_assignment_adds_a_new_key_like_add_and_never_changes_one():
    ctx = FrozenContext({"k": 1})
    ctx["fresh"] = [1, 2]
    assert ctx["fresh"] == [1, 2]
    with pytest.raises(ContextMutationError, match="'fresh'"):
        ctx["fresh"] = 3
    with pytest.raises(ContextMutationError, match="'k'"):
        ctx["k"] = 2
    assert ctx["k"] == 1 and ctx["fresh"] == [1, 2]


def test_keys_cannot_be_deleted():
    ctx = FrozenContext({"k": 1})
    with pytest.raises(ContextMutationError, match="'k'"):
        del ctx["k"]
    assert ctx["k"] == 1


def test_context_mutation_error_is_a_crystallize_error():
    assert issubclass(ContextMutationError, CrystallizeError)


def test_keys_must_be_strings():
    with pytest.raises(TypeError, match="strings"):
        FrozenContext({1: "one"})
    ctx = FrozenContext()
    with pytest.raises(TypeError, match="strings"):
        ctx.add(("a",), 1)


# -- values are not aliases -----------------------------------------------------------


def test_editing_a_list_returned_by_get_does_not_change_the_context():
    ctx = FrozenContext({"items": [1, 2, 3]})
    items = ctx.get("items")
    items.append(4)
    items[0] = 100
    assert ctx.get("items") == [1, 2, 3]
    via_item = ctx["items"]
    via_item.clear()
    assert ctx["items"] == [1, 2, 3]


def test_editing_a_dict_returned_by_get_does_not_change_the_context():
    ctx = FrozenContext({"config": {"lr": 0.1, "layers": [8, 8]}})
    config = ctx.get("config")
    config["lr"] = 99
    config["layers"].append(16)
    config["new"] = True
    assert ctx.get("config") == {"lr": 0.1, "layers": [8, 8]}


def test_editing_a_set_or_nested_tuple_returned_does_not_change_the_context():
    ctx = FrozenContext({"tags": {"a"}, "pair": ([1], [2])})
    ctx.get("tags").add("b")
    ctx.get("pair")[0].append(9)
    assert ctx.get("tags") == {"a"}
    assert ctx.get("pair") == ([1], [2])


def test_editing_the_original_object_does_not_change_the_context():
    initial_list = [1, 2]
    nested = {"inner": [1]}
    ctx = FrozenContext({"items": initial_list, "nested": nested})
    added = {"k": [0]}
    ctx.add("added", added)

    initial_list.append(3)
    nested["inner"].append(2)
    nested["other"] = 1
    added["k"].append(1)

    assert ctx.get("items") == [1, 2]
    assert ctx.get("nested") == {"inner": [1]}
    assert ctx.get("added") == {"k": [0]}


def test_numpy_arrays_come_back_read_only():
    original = np.arange(5.0)
    ctx = FrozenContext({"weights": original})
    weights = ctx.get("weights")
    assert weights.flags.writeable is False
    with pytest.raises(ValueError, match="read-only"):
        weights[0] = 42.0
    original[0] = 42.0  # the caller's own array stays theirs to edit
    assert ctx.get("weights")[0] == 0.0
    assert ctx["weights"].flags.writeable is False


def test_numpy_array_added_later_is_copied_and_read_only():
    ctx = FrozenContext()
    arr = np.ones(3)
    ctx.add("arr", arr)
    arr[:] = 7
    assert ctx["arr"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        ctx["arr"][1] = 0


def test_as_dict_is_a_read_only_snapshot():
    ctx = FrozenContext({"a": 1, "items": [1]})
    view = ctx.as_dict()
    assert isinstance(view, MappingProxyType)
    assert dict(view) == {"a": 1, "items": [1]}
    with pytest.raises(TypeError):
        view["a"] = 2  # type: ignore[index]
    with pytest.raises(TypeError):
        view["b"] = 2  # type: ignore[index]
    view["items"].append(2)
    assert ctx.get("items") == [1]
    ctx.add("later", True)
    assert "later" not in view


# -- metrics --------------------------------------------------------------------------


def test_metrics_add_appends_values_in_order():
    ctx = FrozenContext()
    assert isinstance(ctx.metrics, ContextMetrics)
    ctx.metrics.add("loss", 0.5)
    ctx.metrics.add("loss", 0.25)
    ctx.metrics.add("acc", 0.9)
    assert ctx.metrics["loss"] == (0.5, 0.25)
    assert "acc" in ctx.metrics and "f1" not in ctx.metrics
    assert list(ctx.metrics) == ["loss", "acc"]
    assert len(ctx.metrics) == 2
    assert dict(ctx.metrics.as_dict()) == {"loss": (0.5, 0.25), "acc": (0.9,)}


def test_metrics_as_dict_is_read_only():
    ctx = FrozenContext()
    ctx.metrics.add("loss", 1.0)
    view = ctx.metrics.as_dict()
    assert isinstance(view, MappingProxyType)
    with pytest.raises(TypeError):
        view["loss"] = (0.0,)  # type: ignore[index]
    with pytest.raises(TypeError):
        view["new"] = (0.0,)  # type: ignore[index]
    assert ctx.metrics["loss"] == (1.0,)


def test_editing_a_recorded_metric_value_does_not_change_it():
    ctx = FrozenContext()
    curve = [1.0, 0.5]
    ctx.metrics.add("curve", curve)
    curve.append(0.25)
    assert ctx.metrics["curve"] == ([1.0, 0.5],)


def test_metric_names_must_be_non_empty_strings():
    ctx = FrozenContext()
    with pytest.raises(TypeError, match="metric name"):
        ctx.metrics.add("", 1)
    with pytest.raises(TypeError, match="metric name"):
        ctx.metrics.add(3, 1)  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        ctx.metrics["missing"]


def test_metrics_are_separate_per_context():
    first, second = FrozenContext(), FrozenContext()
    first.metrics.add("x", 1)
    assert "x" not in second.metrics


# -- logger ---------------------------------------------------------------------------


def test_ctx_logger_exists_and_can_be_given(caplog):
    assert isinstance(FrozenContext().logger, logging.Logger)
    mine = logging.getLogger("tests.context.mine")
    ctx = FrozenContext(logger=mine)
    assert ctx.logger is mine
    with caplog.at_level(logging.INFO, logger="tests.context.mine"):
        ctx.logger.info("hello from a step")
    assert "hello from a step" in caplog.text
