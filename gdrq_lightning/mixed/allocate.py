"""``allocate``: one bit width per layer, the least summed score under a size or BOPs budget.

A multiple-choice knapsack: each unit (a layer, or a group of tied layers) takes exactly one of
the report's bit widths; its cost is weight bits (``avg_weight_bits``, ``size_mb``) or bit
operations (``bops``). Solved exactly with ``scipy.optimize.milp`` (HiGHS); where SciPy is
missing or the solver fails, a greedy pass over the convex upgrades (the best score drop per
unit of cost first) gives a feasible plan. Costs are integers (bits, MACs x bits x bits), so
the budget check is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..quant.swap import name_matches
from .plan import BitPlan
from .sensitivity import SensitivityReport
from .ties import check_ties

BUDGETS = ("avg_weight_bits", "size_mb", "bops")


@dataclass
class Unit:
    """Layers that take one bit width together, with their summed scores and costs per choice."""

    names: list[str]
    choices: list[int]
    scores: list[float]
    costs: list[int]


def _units(report: SensitivityReport, kind: str, pins: dict[str, int], ties: list[list[str]]) -> list[Unit]:
    parent = {n: n for n in report.layers}

    def root(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    for group in ties:
        for n in group[1:]:
            parent[root(n)] = root(group[0])
    members: dict[str, list[str]] = {}
    for n in report.layers:
        members.setdefault(root(n), []).append(n)
    units = []
    for names in members.values():
        pinned = {pins[n] for n in names if n in pins}
        if len(pinned) > 1:
            raise ValueError(f"tied layers {names} are pinned to different bit widths {sorted(pinned)}")
        choices = sorted(pinned) if pinned else list(report.bits)
        scores = [sum(_score(report, n, b) for n in names) for b in choices]
        costs = [sum(_cost(report, n, b, kind) for n in names) for b in choices]
        units.append(Unit(names, choices, scores, costs))
    return units


def _score(report: SensitivityReport, name: str, bits: int) -> float:
    value = report.scores[name].get(bits)
    if value is None:  # a pin outside the scored widths: no information, no preference
        return 0.0
    return value if math.isfinite(value) else 1e30


def _cost(report: SensitivityReport, name: str, bits: int, kind: str) -> int:
    if kind == "bops":
        return report.macs[name] * bits * report.act_bits[name]
    return report.params[name] * bits


def _capacity(report: SensitivityReport, kind: str, value: float) -> int:
    """The budget in cost units (weight bits or BOPs), rounded down."""
    if kind == "avg_weight_bits":
        return math.floor(value * sum(report.params.values()) + 1e-6)
    if kind == "size_mb":
        return math.floor(value * 8e6 + 1e-6)
    return math.floor(value + 1e-6)


def _from_cost(report: SensitivityReport, kind: str, cost: int) -> float:
    if kind == "avg_weight_bits":
        return cost / sum(report.params.values())
    return cost / 8e6 if kind == "size_mb" else float(cost)


def solve_milp(units: list[Unit], capacity: int) -> list[int] | None:
    """Exact choice per unit with ``scipy.optimize.milp``; ``None`` when SciPy is missing or fails."""
    try:
        import numpy as np
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        return None
    sizes = [len(u.choices) for u in units]
    n = sum(sizes)
    scores = np.array([s for u in units for s in u.scores], dtype=float)
    scale = float(np.abs(scores).max()) or 1.0
    cost = np.array([c for u in units for c in u.costs], dtype=float)
    one_each = np.zeros((len(units), n))
    start = 0
    for i, k in enumerate(sizes):
        one_each[i, start:start + k] = 1.0
        start += k
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(cost[None, :], -np.inf, capacity)]
    try:
        result = milp(scores / scale, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    except (ValueError, RuntimeError):
        return None
    if result.x is None or not result.success:
        return None
    x = np.round(result.x).astype(int)
    picks, start = [], 0
    for k in sizes:
        chosen = np.flatnonzero(x[start:start + k])
        if len(chosen) != 1:
            return None
        picks.append(int(chosen[0]))
        start += k
    return picks


def solve_greedy(units: list[Unit], capacity: int) -> list[int]:
    """Feasible choice per unit: each starts at its cheapest option, then the upgrade with the largest
    score drop per unit of added cost that still fits is taken, until none improves."""
    picks = [min(range(len(u.costs)), key=lambda j: (u.costs[j], u.scores[j])) for u in units]
    spent = sum(u.costs[j] for u, j in zip(units, picks))
    while True:
        best: tuple[float, int, int] | None = None
        for i, (u, j) in enumerate(zip(units, picks)):
            for k in range(len(u.choices)):
                gain, extra = u.scores[j] - u.scores[k], u.costs[k] - u.costs[j]
                if gain <= 0 or spent + extra > capacity:
                    continue
                ratio = gain / extra if extra > 0 else math.inf
                if best is None or ratio > best[0]:
                    best = (ratio, i, k)
        if best is None:
            return picks
        _, i, k = best
        spent += units[i].costs[k] - units[i].costs[picks[i]]
        picks[i] = k


def _pins(report: SensitivityReport, pin: dict[str, int] | None) -> dict[str, int]:
    pins: dict[str, int] = {}
    for pattern, bits in (pin or {}).items():
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise ValueError(f"pin[{pattern!r}]={bits!r} must be an integer bit width in 1..8")
        matched = [n for n in report.layers if name_matches(n, pattern)]
        if not matched:
            raise ValueError(f"pin pattern {pattern!r} matches no planned layer (some: {', '.join(report.layers[:5])} ...)")
        pins.update(dict.fromkeys(matched, bits))
    return pins


def allocate(
    report: SensitivityReport,
    *,
    avg_weight_bits: float | None = None,
    size_mb: float | None = None,
    bops: float | None = None,
    pin: dict[str, int] | None = None,
    ties: Any = "auto",
) -> BitPlan:
    """One bit width per layer from ``report.bits`` with the least summed score within the budget.

    Exactly one budget: ``avg_weight_bits`` (parameter-weighted mean weight bits over the planned
    layers), ``size_mb`` (their weight storage, ``Σ params x bits / 8 / 1e6``: codes only, no
    scales, no container padding) or ``bops`` (``Σ MACs per image x weight bits x activation
    bits``, activation bits from the config). Layers outside the plan (skipped, float) count in
    none of them.

    Args:
        report: :func:`measure_sensitivity`'s result.
        pin: ``{pattern: bits}``, fixing the matching layers (e.g. ``{"layer4.*": 8}``); a pattern
            matches as in ``QuantConfig.skip``: ``fnmatch`` on the name or a dotted ancestor.
        ties: ``"auto"`` (a residual block's last conv and its downsample conv take one width, see
            :mod:`.ties`), ``"none"``, or a list of groups of layer names.

    Raises:
        ValueError: not exactly one budget, a pin that matches nothing, conflicting pins in a tie,
            or a budget below the cheapest plan (the message gives the reachable range).
    """
    given = {k: v for k, v in (("avg_weight_bits", avg_weight_bits), ("size_mb", size_mb), ("bops", bops)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"allocate needs exactly one budget of {', '.join(BUDGETS)}; got {sorted(given) or 'none'}")
    (kind, value), = given.items()
    pins = _pins(report, pin)
    tie_groups = check_ties(ties, report.layers, report.extra.get("ties"))
    units = _units(report, kind, pins, tie_groups)
    capacity = _capacity(report, kind, float(value))
    lowest, highest = sum(min(u.costs) for u in units), sum(max(u.costs) for u in units)
    if capacity < lowest:
        raise ValueError(
            f"budget {kind}={value:g} is unreachable with bits {list(report.bits)}"
            f"{' and the pins' if pins else ''}: the reachable range is "
            f"{_from_cost(report, kind, lowest):.6g} .. {_from_cost(report, kind, highest):.6g}"
        )
    picks = solve_milp(units, capacity)
    solver = "milp"
    if picks is None:
        picks, solver = solve_greedy(units, capacity), "greedy"
    weight_bits = {n: u.choices[j] for u, j in zip(units, picks) for n in u.names}
    return BitPlan.from_report(report, {n: weight_bits[n] for n in report.layers}, budget={kind: float(value)},
                               solver=solver, pins=pins, ties=tie_groups)


def parse_budget(text: str, name: str = "budget") -> dict[str, float]:
    """``"avg_weight_bits=3"`` -> ``{"avg_weight_bits": 3.0}``.

    Raises:
        ValueError: not ``KIND=NUMBER`` with a known kind.
    """
    kind, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or kind not in BUDGETS or number is None or number <= 0:
        raise ValueError(f"{name} {text!r} must be KIND=NUMBER > 0 with KIND one of: {', '.join(BUDGETS)}")
    return {kind: number}
