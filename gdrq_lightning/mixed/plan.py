"""``BitPlan``: weight bits per layer, what it costs, and how a config or a checkpoint holds it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from rich.table import Table

    from .sensitivity import SensitivityReport

_FNMATCH_CHARS = "*?["


def exact_pattern(name: str) -> str:
    """An ``fnmatch`` pattern that matches ``name`` only: ``*``, ``?`` and ``[`` become ``[*]``,
    ``[?]``, ``[[]`` (a module name may hold them, e.g. a ``ModuleDict`` key). As an ``overrides``
    pattern it also reaches ``name``'s children, and conv/linear layers have none to quantize."""
    return "".join(f"[{c}]" if c in _FNMATCH_CHARS else c for c in name)


@dataclass
class BitPlan:
    """Weight bits per planned layer and the numbers behind them.

    Attributes:
        weight_bits: ``{layer: bits}``.
        params / macs / act_bits: per layer, copied from the report (plain values).
        scores: the report's ``{layer: {bits: score}}``.
        budget: the one budget it was planned under, e.g. ``{"avg_weight_bits": 3.0}``.
        method, batches: of the sensitivity report; ``solver``: ``milp`` or ``greedy``.
        pins: ``{layer: bits}`` fixed by ``pin``; ``ties``: groups kept at one width.
    """

    weight_bits: dict[str, int]
    params: dict[str, int]
    macs: dict[str, int]
    act_bits: dict[str, int]
    scores: dict[str, dict[int, float]] = field(default_factory=dict)
    budget: dict[str, float] = field(default_factory=dict)
    method: str = ""
    batches: int = 0
    solver: str = ""
    pins: dict[str, int] = field(default_factory=dict)
    ties: list[list[str]] = field(default_factory=list)

    @classmethod
    def from_report(cls, report: SensitivityReport, weight_bits: dict[str, int], **kwargs: Any) -> BitPlan:
        return cls(weight_bits=dict(weight_bits), params=dict(report.params), macs=dict(report.macs),
                   act_bits=dict(report.act_bits), scores={n: dict(s) for n, s in report.scores.items()},
                   method=report.method, batches=report.batches, **kwargs)

    # -- what it costs ------------------------------------------------------------------
    @property
    def total_bits(self) -> int:
        return sum(self.params[n] * b for n, b in self.weight_bits.items())

    @property
    def avg_weight_bits(self) -> float:
        """Parameter-weighted mean weight bits over the planned layers."""
        return self.total_bits / max(sum(self.params[n] for n in self.weight_bits), 1)

    @property
    def size_mb(self) -> float:
        """Weight codes of the planned layers in MB: ``Σ params x bits / 8 / 1e6``."""
        return self.total_bits / 8e6

    @property
    def bops(self) -> int:
        """``Σ MACs per image x weight bits x activation bits`` over the planned layers."""
        return sum(self.macs[n] * b * self.act_bits[n] for n, b in self.weight_bits.items())

    @property
    def score(self) -> float:
        """The summed sensitivity score of the plan (what the allocation minimised)."""
        return sum(self.scores.get(n, {}).get(b, 0.0) for n, b in self.weight_bits.items())

    def uniform(self, bits: int) -> BitPlan:
        """The same layers, all at ``bits`` (for comparisons)."""
        data = self.to_dict()
        data.update(weight_bits=dict.fromkeys(self.weight_bits, bits), budget={}, solver="uniform", pins={}, ties=[])
        return BitPlan.from_dict(data)

    # -- where it goes ------------------------------------------------------------------
    @property
    def overrides(self) -> dict[str, dict[str, int]]:
        """``QuantConfig.overrides`` entries: exact layer name -> ``{"weight_bits": b}``."""
        return {exact_pattern(n): {"weight_bits": b} for n, b in self.weight_bits.items()}

    def histogram(self) -> dict[int, int]:
        """Layers per bit width."""
        counts: dict[int, int] = {}
        for b in self.weight_bits.values():
            counts[b] = counts.get(b, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, ints, floats and strings: loadable with ``torch.load(weights_only=True)``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitPlan:
        data = dict(data)
        data["weight_bits"] = {str(n): int(b) for n, b in data["weight_bits"].items()}
        data["scores"] = {n: {int(b): float(s) for b, s in row.items()} for n, row in data.get("scores", {}).items()}
        data["ties"] = [list(g) for g in data.get("ties", [])]
        return cls(**data)

    def summary(self) -> str:
        budget = ", ".join(f"{k}={v:g}" for k, v in self.budget.items()) or "none"
        return (f"{len(self.weight_bits)} layers, bits {self.histogram()}, avg {self.avg_weight_bits:.3f} weight bits, "
                f"{self.size_mb:.4f} MB, {self.bops:.4g} BOPs (budget {budget}; {self.method}, {self.solver})")

    def to_yaml(self) -> str:
        """The plan as a ``QuantConfig`` fragment (``overrides:``) with a comment header of its totals."""
        header = [f"# bit plan: {self.summary()}"]
        return "\n".join(header) + "\n" + yaml.safe_dump({"overrides": self.overrides}, sort_keys=False)

    def table(self) -> Table:
        """A Rich table: layer, params, MACs, bits, and the score at each scored width."""
        from rich.table import Table

        widths = sorted({b for row in self.scores.values() for b in row})
        table = Table(title=f"bit plan ({self.method}): {self.summary()}", title_justify="left")
        for col in ("layer", "params", "MACs", "bits", *(f"score@{b}" for b in widths)):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for n, b in self.weight_bits.items():
            row = self.scores.get(n, {})
            table.add_row(n, f"{self.params[n]:,}", f"{self.macs[n]:,}", str(b), *(f"{row.get(w, float('nan')):.3g}" for w in widths))
        return table
