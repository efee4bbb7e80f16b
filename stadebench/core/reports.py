"""The engine's data: the calibration settings it reads, what ``prune`` reports per layer,
per block and per call, and the one-shot statistics ``collect_statistics`` gathers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..base import LayerStats


@dataclass(frozen=True)
class Calibration:
    """How calibration windows feed the blocks: the suite's ``calibration`` knobs that the
    engine reads, under the same names (a suite's ``CalibrationSpec`` is passed as it is).

    Attributes:
        sequential: each block sees the pruned outputs of the previous one (True), or
            the dense ones (False, one-shot).
        batch_size: calibration windows per forward pass.
        accumulate: how input statistics are summed (``core.statistics.ACCUMULATORS``:
            ``float64``, or the reference releases' ``released``).
    """

    sequential: bool = True
    batch_size: int = 8
    accumulate: str = "float64"


@dataclass
class LayerReport:
    """What happened to one prunable layer."""

    name: str
    block: int
    role: str | None
    shape: tuple[int, int]
    pruned: int
    """Weights pruned (0 for a layer left dense)."""
    sparsity: float
    """Realised sparsity: pruned / weights."""
    bias_added: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    """What a solver reported for this layer, e.g. ``{"percdamp": 0.1}`` after a retry."""
    allocated: float | None = None
    """The sparsity this layer was asked for (the target, or its allocator's share); None
    for a layer left dense."""
    dense: bool = False
    """Left dense: outside the layers selected for pruning (``targets`` / ``ignore``)."""
    output_mse: float | None = None
    """Mean squared error of the layer's outputs, pruned against dense, on the calibration
    inputs, computed exactly from their Gram matrix when the metric collected it; else None."""


@dataclass
class BlockReport:
    """One block: reconstruction error of its outputs on the calibration inputs."""

    index: int
    mse: float | None
    """Mean squared error between dense and pruned block outputs (None: no forward pass)."""
    cosine: float | None
    """Mean over tokens of the cosine similarity of dense and pruned outputs."""
    seconds: float


@dataclass
class PruneReport:
    """What ``prune`` did: realised sparsity, reconstruction error, time, memory."""

    metric: str
    metric_version: str
    metric_options: dict[str, Any]
    pattern: str
    target_sparsity: float
    sparsity: float
    """Realised sparsity over the pruned layers (pruned / their weights); layers left dense
    by an allocation are not counted."""
    sequential: bool
    n: int
    """Calibration windows (``calibration.n``); 0 for a data-free metric."""
    seqlen: int
    batch_size: int
    device: str
    seconds: float
    """Wall time of the whole call."""
    timings: dict[str, float]
    """Seconds by phase: capture (block-0 inputs), stats (pass 1), prune, forward (pass 2)."""
    block_passes: int
    """Forward passes of blocks over the calibration batches (0 for data-free metrics)."""
    peak_memory_bytes: int
    """Peak CUDA memory allocated on a GPU; peak process RSS on a CPU."""
    layers: list[LayerReport] = field(default_factory=list)
    blocks: list[BlockReport] = field(default_factory=list)
    offloaded: bool = False
    """Whether block activations were kept in CPU memory between passes."""
    config_flags: list[str] = field(default_factory=list)
    """Config flags turned on so that added biases survive save and reload."""
    accumulate: str = "float64"
    """How input statistics were summed (``calibration.accumulate``)."""
    shared_statistics: bool = False
    """Statistics came from ``collect_statistics`` (its passes and seconds are counted
    there, not here) and no reconstruction error was measured."""
    gradients: dict[str, Any] | None = None
    """For a metric that reads ``gradient``: the gradient pass's ``seconds``, whether it was
    ``cached`` (read from disk) or ``shared`` (given to ``prune``, its seconds not counted
    here), its ``scale`` and ``megabytes``; None otherwise."""
    stages: dict[str, Any] | None = None
    """The refiner and reconstructor applied after the metric (name, version, options each;
    ``core.stages.Stages.describe``), and the seconds each took over all layers; None
    without stages."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CalibrationStatistics:
    """Input statistics of every prunable layer of a dense model (one-shot protocol).

    Built by ``collect_statistics``; pass it to ``prune(..., statistics=...)`` for
    each metric whose ``statistics`` it covers. Held in CPU memory.
    """

    needs: frozenset[str]
    """The statistics collected (a union of metrics' ``statistics``)."""
    layers: dict[str, LayerStats]
    """By full layer name, with each layer's role."""
    n: int
    """Calibration windows (``calibration.n``)."""
    seqlen: int
    batch_size: int
    seconds: float
    """Wall time of the collection (capture and one pass of every block)."""
    block_passes: int
    nbytes: int
    """Memory the statistics take."""
    accumulate: str = "float64"
    """How they were summed (``core.statistics.ACCUMULATORS``)."""


__all__ = ["BlockReport", "Calibration", "CalibrationStatistics", "LayerReport", "PruneReport"]
