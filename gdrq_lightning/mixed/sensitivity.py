"""Per-layer sensitivity to weight quantization: ``measure_sensitivity`` (docs/methods.md#mixed-precision).

A score estimates how much the task loss grows when one layer's weights go to ``b`` bits with
the rest left float, so the summed score of a plan stands for the plan's loss increase. The
error each layer would get, ``ΔW = Q_b(W) - W``, comes from the configured method's own weight
quantizer (:func:`~.layers.weight_errors`; with a numeric ``k_w`` Scale-Clip's clip, the same at
every width, is left out). Methods:

* ``fisher`` (the default): one forward + backward per micro-batch of 8 samples (batches are
  split where their fields allow, :func:`split_batch`) scores every layer and bit width; the
  score is the mean over micro-batches of ``(g · ΔW)²``, the squared change of the loss that a
  linearised model predicts: ``ΔWᵀ F ΔW`` with the layer's whole empirical Fisher ``F`` (from
  8-sample gradients), not its diagonal. Works wherever the loss has a gradient (torchvision's
  ``roi_align`` has no double backward: nothing here needs one).
* ``fisher_diag``: ``Σ_i mean(g_i²) ΔW_i²``, the diagonal empirical Fisher, whole batches.
* ``fisher_naive``: ``mean(g²) · ‖ΔW‖²``, layer means, whole batches (the form the planning
  issue measured).
* ``measured``: the loss increase itself, one layer at a time at each bit width (a forward per
  batch, layer and bit width: exact, and slow on large networks).
* ``mse``: ``‖ΔW‖² / ‖W‖²``, the weight noise-to-signal ratio (no data; a baseline).

The benchmark behind the choice of the default is in ``benchmarks/mixed_precision.py``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..quant import QuantConfig
from ..quant.distributed import reduce_, world_size
from .layers import Layer, LossFn, count_macs, counted_layers, measuring, weight_errors
from .ties import residual_ties

DEFAULT_METHOD = "fisher"
FISHER_MICRO_BATCH = 8  # samples per gradient: 8 ranked layers as well as 1 on the digits models, at 1/4 the time
DEFAULT_BITS = (2, 3, 4, 8)
Errors = dict[str, dict[int, Tensor]]
Scorer = Callable[[nn.Module, list[Layer], Errors, list[Any], LossFn], tuple[Tensor, int]]


@dataclass
class SensitivityReport:
    """Scores and sizes of the layers a plan covers.

    Attributes:
        scores: ``{layer: {bits: score}}`` (larger: the loss suffers more).
        params: weight elements per layer.
        macs: multiply-accumulates per image per layer (one batch, forward hooks).
        act_bits: the configured activation bits of each layer (for BOPs).
        method: the score's method; ``batches``: batches scored (summed over DDP ranks);
        bits: the bit widths scored; ``seconds``: wall time of the measurement.
        extra: ``{"ties": [[layer, ...], ...]}``, the residual ties ``allocate(ties="auto")`` uses.
    """

    scores: dict[str, dict[int, float]]
    params: dict[str, int]
    macs: dict[str, int]
    act_bits: dict[str, int]
    method: str
    batches: int
    bits: tuple[int, ...]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.scores)

    def ranking(self, bits: int) -> list[str]:
        """Layers from the most to the least sensitive at ``bits``."""
        return sorted(self.scores, key=lambda n: -self.scores[n][bits])

    def to_dict(self) -> dict[str, Any]:
        """Plain values (``torch.load(weights_only=True)``-safe, YAML-safe)."""
        return {**asdict(self), "bits": list(self.bits)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityReport:
        scores = {n: {int(b): float(s) for b, s in row.items()} for n, row in data["scores"].items()}
        return cls(**{**data, "scores": scores, "bits": tuple(int(b) for b in data["bits"])})


def check_bits(bits: Iterable[int]) -> tuple[int, ...]:
    """Sorted unique bit widths, each an integer 1..8.

    Raises:
        ValueError: empty, or a width that is not an integer in 1..8.
    """
    bits = tuple(bits)
    bad = [b for b in bits if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 8]
    if not bits or bad:
        raise ValueError(f"bits={bits!r}: give one or more integer weight bit widths in 1..8 (e.g. 2, 3, 4, 8)")
    return tuple(sorted(set(bits)))


@contextmanager
def seeded(index: int) -> Iterator[None]:
    """The same random draws (a detector's proposal sampling, dropout) for batch ``index`` in every pass."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(1_000_003 + index)
        yield


def _leading(field: Any) -> int | None:
    if isinstance(field, Tensor):
        return int(field.shape[0]) if field.dim() > 0 else None
    return len(field) if isinstance(field, (list, tuple)) else None


def _take(field: Any, start: int, stop: int) -> Any:
    return field[start:stop] if isinstance(field, Tensor) else type(field)(field[start:stop])


def split_batch(batch: Any, size: int | None) -> list[Any]:
    """``batch`` in pieces of at most ``size`` samples: a tensor along dim 0; a tuple/list/dict of
    fields (tensors, or sequences of per-sample items such as a detector's images and targets)
    when every field has the same leading length; anything else stays whole."""
    if not size:
        return [batch]
    if isinstance(batch, Tensor):
        fields, rebuild = [batch], lambda parts: parts[0]
    elif isinstance(batch, dict):
        fields, rebuild = list(batch.values()), lambda parts: dict(zip(batch, parts))
    elif isinstance(batch, (list, tuple)):
        fields, rebuild = list(batch), lambda parts: type(batch)(parts)
    else:
        return [batch]
    lengths = {_leading(f) for f in fields}
    n = lengths.pop() if len(lengths) == 1 else None
    if n is None or n <= size:
        return [batch]
    return [rebuild([_take(f, i, i + size) for f in fields]) for i in range(0, n, size)]


def gradient_statistics(model: nn.Module, layers: list[Layer], errors: Errors, batches: list[Any],
                        loss_fn: LossFn, micro_batch: int | None = None) -> dict[str, Tensor]:
    """One forward + backward per (micro-)batch; sums over them, ``[layers, bits]`` float64, of
    ``(g·ΔW)²`` (``linear_sq``), ``g·ΔW`` (``linear``), ``Σ g_i² ΔW_i²`` (``diag``) and
    ``mean(g²) ‖ΔW‖²`` (``naive``), with ``g`` the loss's gradient of the layer's weight, and
    ``count``, the number of gradients summed. ``micro_batch``: split each batch first
    (:func:`split_batch`), for gradients closer to per-sample ones."""
    bits = list(next(iter(errors.values())))
    weights = [layer.weight for layer in layers]
    shape = (len(layers), len(bits))
    sums = {k: torch.zeros(shape, dtype=torch.float64) for k in ("linear_sq", "linear", "diag", "naive")}
    pieces = [piece for batch in batches for piece in split_batch(batch, micro_batch)]
    sums["count"] = torch.tensor(float(len(pieces)), dtype=torch.float64)
    for i, batch in enumerate(pieces):
        with seeded(i):
            loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for li, (layer, g) in enumerate(zip(layers, grads)):
            if g is None:
                continue
            g = g.detach().double()
            g2 = g * g
            for bi, b in enumerate(bits):
                e = errors[layer.name][b].double()
                dot = float((g * e).sum())
                sums["linear_sq"][li, bi] += dot * dot
                sums["linear"][li, bi] += dot
                sums["diag"][li, bi] += float((g2 * e * e).sum())
                sums["naive"][li, bi] += float(g2.mean() * (e * e).sum())
    return sums


def gradient_scorer(key: str, micro_batch: int | None = None) -> Scorer:
    """A :data:`METHODS` entry scoring with one statistic of :func:`gradient_statistics`."""
    def score(model: nn.Module, layers: list[Layer], errors: Errors, batches: list[Any], loss_fn: LossFn) -> tuple[Tensor, int]:
        stats = gradient_statistics(model, layers, errors, batches, loss_fn, micro_batch)
        return stats[key] * (len(batches) / float(stats["count"])), len(batches)

    return score


@torch.no_grad()
def _measured(model: nn.Module, layers: list[Layer], errors: Errors, batches: list[Any], loss_fn: LossFn) -> tuple[Tensor, int]:
    """Sum over batches of ``loss(one layer at b bits) - loss(float)``."""
    def losses() -> list[float]:
        out = []
        for i, batch in enumerate(batches):
            with seeded(i):
                out.append(float(loss_fn(model, batch)))
        return out

    base = losses()
    bits = list(next(iter(errors.values())))
    sums = torch.zeros(len(layers), len(bits), dtype=torch.float64)
    for li, layer in enumerate(layers):
        original = layer.weight.detach().clone()
        try:
            for bi, b in enumerate(bits):
                layer.weight.add_(errors[layer.name][b])
                sums[li, bi] = sum(q - f for q, f in zip(losses(), base))
                layer.weight.copy_(original)
        finally:
            layer.weight.copy_(original)
    return sums, len(batches)


def _mse(model: nn.Module, layers: list[Layer], errors: Errors, batches: list[Any], loss_fn: LossFn) -> tuple[Tensor, int]:
    bits = list(next(iter(errors.values())))
    sums = torch.zeros(len(layers), len(bits), dtype=torch.float64)
    for li, layer in enumerate(layers):
        norm = float(layer.weight.detach().double().pow(2).sum()) or 1.0
        for bi, b in enumerate(bits):
            sums[li, bi] = float(errors[layer.name][b].double().pow(2).sum()) / norm
    return sums, 1


METHODS: dict[str, Scorer] = {
    "fisher": gradient_scorer("linear_sq", micro_batch=FISHER_MICRO_BATCH),
    "fisher_diag": gradient_scorer("diag"),
    "fisher_naive": gradient_scorer("naive"),
    "measured": _measured,
    "mse": _mse,
}


def measure_sensitivity(
    model: nn.Module,
    config: QuantConfig,
    batches: Iterable[Any],
    loss_fn: LossFn,
    bits: Iterable[int] = DEFAULT_BITS,
    method: str = DEFAULT_METHOD,
) -> SensitivityReport:
    """Score every layer ``config`` quantizes at every bit width in ``bits``.

    The network is measured in train mode with BatchNorms in eval mode (running statistics:
    the network as it infers, and none updated) and, for an already-swapped network, with its
    quantizers off; every mode, switch and weight is restored afterwards. Under DDP each rank
    scores its own batches and the sums are all-reduced, so every rank returns the same report.

    Args:
        model: a float network, or one ``quantize_model`` already swapped (scored as float).
        config: the run's config: its method's weight quantizer gives each layer's error at ``b``
            bits, its ``skip`` (or the library default) and ``overrides`` decide which layers count.
        batches: an iterable of batches (read into a list: some methods pass over them often).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, e.g. a task's training loss.
        bits: weight bit widths to score.
        method: one of :data:`METHODS` (default :data:`DEFAULT_METHOD`).

    Raises:
        ValueError: unknown ``method``, bad ``bits``, no batches, or no layer to plan.
    """
    if method not in METHODS:
        raise ValueError(f"sensitivity method {method!r} is not one of: {', '.join(METHODS)}")
    bits = check_bits(bits)
    batches = list(batches)
    if not batches:
        raise ValueError("measure_sensitivity needs at least one batch")
    start = time.perf_counter()
    layers = counted_layers(model, config)
    with measuring(model, layers):
        errors = {layer.name: weight_errors(layer, bits) for layer in layers}
        macs = count_macs(model, layers, loss_fn, batches[0])
        sums, count = METHODS[method](model, layers, errors, batches, loss_fn)
    # one collective: score sums, batch count and MACs (image sizes may differ between ranks)
    flat = torch.cat([sums.reshape(-1), torch.tensor([float(count)], dtype=torch.float64),
                      torch.tensor([float(macs[layer.name]) for layer in layers], dtype=torch.float64)])
    device = layers[0].weight.device
    flat = reduce_(flat.to(device), "sum").cpu()
    n_sums = sums.numel()
    total = float(flat[n_sums])
    scores_t = (flat[:n_sums] / total).reshape(sums.shape)
    macs_all = flat[n_sums + 1:] / world_size()
    return SensitivityReport(
        scores={layer.name: {b: float(scores_t[li, bi]) for bi, b in enumerate(bits)} for li, layer in enumerate(layers)},
        params={layer.name: int(layer.weight.numel()) for layer in layers},
        macs={layer.name: int(round(float(m))) for layer, m in zip(layers, macs_all)},
        act_bits={layer.name: int(layer.config.act_bits) for layer in layers},
        method=method, batches=int(round(total)) if method != "mse" else 0, bits=bits,
        seconds=time.perf_counter() - start,
        extra={"ties": residual_ties(model, [layer.name for layer in layers])},
    )
