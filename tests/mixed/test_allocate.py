"""``allocate``: the exact solver against brute force, the greedy fallback, budgets, pins, ties,
the unreachable-budget error; ``BitPlan`` totals, overrides and its plain-value round trip."""
from __future__ import annotations

import io
import itertools
import random
import sys

import pytest
import torch
import yaml

from gdrq_lightning.mixed import BitPlan, SensitivityReport, allocate
from gdrq_lightning.mixed.allocate import Unit, solve_greedy, solve_milp

BITS = (2, 3, 4, 8)


def report(n: int, seed: int, bits: tuple[int, ...] = BITS, ties: list | None = None) -> SensitivityReport:
    rng = random.Random(seed)
    names = [f"block{i}.conv" for i in range(n)]
    scores = {}
    for name in names:
        base = rng.uniform(0.01, 10)
        scores[name] = {b: base * 4.0 ** (-b) * rng.uniform(0.5, 1.5) for b in bits}
    return SensitivityReport(
        scores=scores, params={nm: rng.choice([100, 250, 1000, 4000]) for nm in names},
        macs={nm: rng.choice([10_000, 50_000, 200_000]) for nm in names}, act_bits=dict.fromkeys(names, 4),
        method="test", batches=1, bits=bits, extra={"ties": ties or []},
    )


def brute_force(rep: SensitivityReport, cost, capacity: float, fixed: dict | None = None, ties: list | None = None):
    best = None
    names = rep.layers
    for combo in itertools.product(rep.bits, repeat=len(names)):
        plan = dict(zip(names, combo))
        if fixed and any(plan[n] != b for n, b in fixed.items()):
            continue
        if ties and any(len({plan[n] for n in g}) > 1 for g in ties):
            continue
        if sum(cost(n, b) for n, b in plan.items()) > capacity:
            continue
        score = sum(rep.scores[n][b] for n, b in plan.items())
        if best is None or score < best[0] - 1e-12:
            best = (score, plan)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("avg", [2.4, 3.0, 4.5])
def test_milp_matches_brute_force_on_avg_bits(seed: int, avg: float) -> None:
    rep = report(5, seed)
    plan = allocate(rep, avg_weight_bits=avg, ties="none")
    total = sum(rep.params.values())
    best_score, best = brute_force(rep, lambda n, b: rep.params[n] * b, avg * total)
    assert plan.solver == "milp"
    assert plan.score == pytest.approx(best_score, rel=1e-9)
    assert plan.avg_weight_bits <= avg + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_milp_matches_brute_force_on_bops_and_size(seed: int) -> None:
    rep = report(5, seed)
    bops = 0.6 * sum(rep.macs[n] * 8 * 4 for n in rep.layers)
    plan = allocate(rep, bops=bops, ties="none")
    best_score, _ = brute_force(rep, lambda n, b: rep.macs[n] * b * 4, bops)
    assert plan.score == pytest.approx(best_score, rel=1e-9) and plan.bops <= bops
    size = 0.5 * sum(rep.params.values()) * 8 / 8e6
    plan = allocate(rep, size_mb=size, ties="none")
    best_score, _ = brute_force(rep, lambda n, b: rep.params[n] * b, size * 8e6)
    assert plan.score == pytest.approx(best_score, rel=1e-9) and plan.size_mb <= size


@pytest.mark.parametrize("seed", range(6))
def test_greedy_fallback_is_feasible_and_close(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = report(6, seed)
    exact = allocate(rep, avg_weight_bits=3.0, ties="none")
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # SciPy missing: the import fails
    greedy = allocate(rep, avg_weight_bits=3.0, ties="none")
    assert greedy.solver == "greedy"
    assert greedy.avg_weight_bits <= 3.0
    assert exact.score <= greedy.score + 1e-12


def test_greedy_takes_the_best_ratio_upgrade() -> None:
    units = [Unit(["a"], [2, 8], [10.0, 0.0], [2, 8]), Unit(["b"], [2, 8], [3.0, 0.0], [2, 8])]
    assert solve_greedy(units, capacity=10) == [1, 0]  # a's upgrade saves 10 for 6 bits, b's only 3
    assert solve_milp(units, capacity=10) == [1, 0]
    assert solve_greedy(units, capacity=16) == [1, 1]


def test_pins_fix_layers_and_match_nothing_is_an_error() -> None:
    rep = report(5, 1)
    plan = allocate(rep, avg_weight_bits=5.0, pin={"block0.*": 8, "block4.conv": 2}, ties="none")
    assert plan.weight_bits["block0.conv"] == 8 and plan.weight_bits["block4.conv"] == 2
    total = sum(rep.params.values())
    best_score, best = brute_force(rep, lambda n, b: rep.params[n] * b, 5.0 * total,
                                   fixed={"block0.conv": 8, "block4.conv": 2})
    assert plan.weight_bits == best and plan.pins == {"block0.conv": 8, "block4.conv": 2}
    with pytest.raises(ValueError, match=r"pin pattern 'head\*' matches no planned layer"):
        allocate(rep, avg_weight_bits=3.0, pin={"head*": 8})
    with pytest.raises(ValueError, match="pin.*must be an integer bit width"):
        allocate(rep, avg_weight_bits=3.0, pin={"block0.*": 9})


def test_ties_keep_groups_at_one_width_auto_and_explicit() -> None:
    groups = [["block1.conv", "block2.conv"]]
    rep = report(5, 3, ties=groups)
    # scores that pull the two apart: block1 wants 8 bits, block2 is cheap to cut
    rep.scores["block1.conv"] = {b: 100.0 * (8 - b) for b in BITS}
    rep.scores["block2.conv"] = dict.fromkeys(BITS, 0.0)
    free = allocate(rep, avg_weight_bits=3.0, ties="none")
    assert free.weight_bits["block1.conv"] != free.weight_bits["block2.conv"]
    for ties in ("auto", groups):
        tied = allocate(rep, avg_weight_bits=3.0, ties=ties)
        assert tied.weight_bits["block1.conv"] == tied.weight_bits["block2.conv"]
        assert tied.ties == groups
        total = sum(rep.params.values())
        assert tied.score == pytest.approx(brute_force(rep, lambda n, b: rep.params[n] * b, 3.0 * total, ties=groups)[0])
    with pytest.raises(ValueError, match="different bit widths"):
        allocate(rep, avg_weight_bits=3.0, pin={"block1.conv": 8, "block2.conv": 2})
    with pytest.raises(ValueError, match=r"not_a_layer"):
        allocate(rep, avg_weight_bits=3.0, ties=[["block1.conv", "not_a_layer"]])


def test_unreachable_budget_prints_the_reachable_range() -> None:
    rep = report(4, 0)
    with pytest.raises(ValueError, match=r"avg_weight_bits=1.5 is unreachable .*reachable range is 2 \.\. 8"):
        allocate(rep, avg_weight_bits=1.5)
    total = sum(rep.params.values())
    with pytest.raises(ValueError, match=r"the pins: the reachable range is"):
        allocate(rep, avg_weight_bits=2.5, pin={"*": 4})
    assert allocate(rep, size_mb=total * 2 / 8e6).weight_bits == dict.fromkeys(rep.layers, 2)  # the bottom is reachable
    assert allocate(rep, avg_weight_bits=100).weight_bits == dict.fromkeys(rep.layers, 8)


@pytest.mark.parametrize("kwargs", [{}, {"avg_weight_bits": 3, "bops": 5}])
def test_exactly_one_budget(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one budget"):
        allocate(report(3, 0), **kwargs)


def test_bitplan_totals_overrides_yaml_and_plain_round_trip() -> None:
    rep = report(3, 0)
    plan = allocate(rep, avg_weight_bits=4.0, ties="none")
    bits = plan.weight_bits
    assert plan.size_mb == sum(rep.params[n] * b for n, b in bits.items()) / 8e6
    assert plan.bops == sum(rep.macs[n] * b * 4 for n, b in bits.items())
    assert plan.avg_weight_bits == sum(rep.params[n] * b for n, b in bits.items()) / sum(rep.params.values())
    assert plan.overrides == {n: {"weight_bits": b} for n, b in bits.items()}
    assert yaml.safe_load(plan.to_yaml()) == {"overrides": plan.overrides}
    buf = io.BytesIO()
    torch.save(plan.to_dict(), buf)
    buf.seek(0)
    assert BitPlan.from_dict(torch.load(buf, weights_only=True)) == plan  # plain values only
    assert len(plan.table().rows) == 3


def test_exact_names_with_fnmatch_characters_are_escaped() -> None:
    plan = BitPlan(weight_bits={"heads.cls[0]": 4, "a*b?": 2}, params={"heads.cls[0]": 1, "a*b?": 1},
                   macs={"heads.cls[0]": 1, "a*b?": 1}, act_bits={"heads.cls[0]": 4, "a*b?": 4})
    from gdrq_lightning.quant.swap import name_matches

    patterns = list(plan.overrides)
    assert patterns == ["heads.cls[[]0]", "a[*]b[?]"]
    assert name_matches("heads.cls[0]", patterns[0]) and not name_matches("heads.cls0", patterns[0])
    assert name_matches("a*b?", patterns[1]) and not name_matches("axbc", patterns[1])
