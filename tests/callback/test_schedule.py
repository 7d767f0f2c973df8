"""``Schedule``: parsing of phase starts, order checks and ``due`` (docs/methods.md#schedule)."""
from __future__ import annotations

import pytest

from gdrq_lightning import Schedule
from gdrq_lightning.schedule import PHASES, Start, parse_start

OFF = dict(scale_clip=None, quant_weights=None, quant_acts=None, groups=None, freeze_bn=None)


def test_phase_order_is_the_spec_order() -> None:
    assert PHASES == ("scale_clip", "quant_weights", "quant_acts", "groups", "freeze_bn")


def test_default_turns_everything_but_freeze_bn_on_at_once() -> None:
    s = Schedule()
    assert s.due(0, 0) == ["scale_clip", "quant_weights", "quant_acts", "groups"]
    assert s.due(10**6, 10**9) == ["scale_clip", "quant_weights", "quant_acts", "groups"]


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (3, "epoch", Start("epoch", 3)),
        (3, "step", Start("step", 3)),
        (0, "epoch", Start("epoch", 0)),
        ("7", "epoch", Start("epoch", 7)),
        ("step:500", "epoch", Start("step", 500)),
        ("epoch:2", "step", Start("epoch", 2)),
        (" STEP:5 ", "epoch", Start("step", 5)),
        (None, "epoch", None),
        ("null", "epoch", None),
        ("none", "step", None),
        ("skip", "epoch", None),
    ],
)
def test_parse_start(value: object, unit: str, expected: Start | None) -> None:
    assert parse_start("quant_acts", value, unit) == expected


@pytest.mark.parametrize("value", [-1, "-3", "step:-1", "week:3", "step:", "step:1.5", "epoch:two", 1.5, True, [1]])
def test_bad_start_is_a_value_error_naming_the_phase(value: object) -> None:
    with pytest.raises(ValueError, match=r"Schedule\.quant_acts="):
        Schedule(quant_acts=value)


def test_bad_unit_names_the_allowed_units() -> None:
    with pytest.raises(ValueError, match=r"Schedule\.unit='minute'.*epoch, step"):
        Schedule(unit="minute")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "late", "early"),
    [
        (dict(scale_clip=2, quant_weights=1), "quant_weights", "scale_clip"),
        (dict(quant_acts="step:100", groups="step:50"), "groups", "quant_acts"),
        (dict(quant_weights=3, quant_acts=None, groups=None, freeze_bn=2), "freeze_bn", "quant_weights"),
    ],
)
def test_phases_out_of_order_are_rejected(kwargs: dict, late: str, early: str) -> None:
    with pytest.raises(ValueError, match=rf"out of order: {late} .* before {early}"):
        Schedule(**{**OFF, **kwargs})


def test_equal_starts_and_mixed_units_are_allowed() -> None:
    s = Schedule(scale_clip=1, quant_weights=1, quant_acts="step:3", groups=2, freeze_bn="step:10")
    assert s.starts()["groups"] == Start("epoch", 2)
    assert Schedule(scale_clip="step:500", quant_weights=0).starts()["quant_weights"] == Start("epoch", 0)


@pytest.mark.parametrize(
    ("kwargs", "late", "early"),
    [
        # a step-based phase in between used to hide the epoch phases' order
        (dict(scale_clip=1, quant_weights=1, quant_acts="step:3", groups=0), "groups", "quant_weights"),
        (dict(scale_clip=3, quant_weights="step:5", quant_acts="step:6", groups=None, freeze_bn=2), "freeze_bn", "scale_clip"),
        (dict(scale_clip="step:9", quant_weights=1, quant_acts=2, groups="step:4"), "groups", "scale_clip"),
    ],
)
def test_every_earlier_phase_of_the_same_unit_is_compared(kwargs: dict, late: str, early: str) -> None:
    with pytest.raises(ValueError, match=rf"out of order: {late} .* before {early}"):
        Schedule(**{**OFF, **kwargs})


def test_due_mixes_epochs_and_steps_in_phase_order() -> None:
    s = Schedule(scale_clip=0, quant_weights="step:5", quant_acts=2, groups=None, freeze_bn="step:10")
    assert s.due(0, 0) == ["scale_clip"]
    assert s.due(0, 4) == ["scale_clip"]
    assert s.due(0, 5) == ["scale_clip", "quant_weights"]
    assert s.due(1, 9) == ["scale_clip", "quant_weights"]
    assert s.due(2, 9) == ["scale_clip", "quant_weights", "quant_acts"]
    assert s.due(2, 10) == ["scale_clip", "quant_weights", "quant_acts", "freeze_bn"]
    assert s.due(5, 0) == ["scale_clip", "quant_acts"]  # epoch- and step-based starts are independent


def test_integer_starts_count_in_the_unit() -> None:
    s = Schedule(scale_clip=2, quant_weights=4, quant_acts=None, groups=None, freeze_bn=None, unit="step")
    assert s.due(100, 1) == []
    assert s.due(0, 2) == ["scale_clip"]
    assert s.due(0, 4) == ["scale_clip", "quant_weights"]


def test_all_skipped_is_never_due() -> None:
    assert Schedule(**OFF).due(10**6, 10**9) == []


def test_describe_lists_every_phase() -> None:
    s = Schedule(scale_clip="step:3", quant_weights=1, quant_acts=None, groups=None, freeze_bn=None)
    assert s.describe() == (
        "scale_clip@step 3, quant_weights@epoch 1, quant_acts: skipped, groups: skipped, freeze_bn: skipped"
    )
