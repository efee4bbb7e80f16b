"""Base classes that plugins subclass: Metric, Pattern, Dataset, Evaluator.

Each has a class-level ``name`` (unique within its kind), a ``version`` that is
recorded with every result, and an ``Options`` pydantic model (unknown keys rejected).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch


class Options(BaseModel):
    """Base of every options model: unknown keys are an error, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _validate_options(cls: type, options: dict[str, Any] | BaseModel | None) -> BaseModel:
    if isinstance(options, cls.Options):
        return options
    try:
        return cls.Options.model_validate(dict(options or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(options)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid options for {cls.kind} {cls.name!r}: {problems}") from None


class _Named:
    kind: ClassVar[str] = "item"
    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: dict[str, Any] | BaseModel | None = None):
        self.options = _validate_options(type(self), options)


# --- pruning ---------------------------------------------------------------------


STATISTICS = frozenset({"sum", "sumsq", "gram"})


@dataclass(frozen=True)
class LayerInfo:
    """Where a prunable linear layer sits.

    Attributes:
        name: module path inside the model, e.g. ``model.layers.3.self_attn.o_proj``.
        block: index of the decoder block.
        short_name: path inside the block, e.g. ``self_attn.o_proj``.
        role: ``"normed"`` when the layer's input is the output of a normalisation
            layer (q/k/v, gate/up, fc1), ``"internal"`` when it is an internal
            activation (attention output, MLP hidden state); None when unknown
            (data-free pruning runs no forward pass to find out).
    """

    name: str
    block: int
    short_name: str
    role: str | None = None


@dataclass
class LayerStats:
    """Input statistics of one linear layer, accumulated over calibration tokens.

    Only the statistics the metric asked for (``Metric.statistics``) are filled; the
    others are None. Sums are float64, the Gram matrix float32, all on the device
    where pruning runs.

    Attributes:
        layer: which layer these statistics belong to.
        count: number of tokens seen.
        sum: Σ_t x_t (shape ``[in]``).
        sumsq: Σ_t x_t² (shape ``[in]``).
        gram: Σ_t x_t x_tᵀ (shape ``[in, in]``).
        m2: Σ_t (x_t − μ)², kept with ``sum`` for an accurate variance.
    """

    layer: LayerInfo
    count: int = 0
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        """Per-input mean μ_j (float32)."""
        return (self.sum / self.count).float()

    @property
    def var(self) -> torch.Tensor:
        """Per-input unbiased variance over tokens (float32)."""
        n = self.count
        m2 = self.m2 if self.m2 is not None else self.sumsq - self.sum * self.sum / n
        return (m2 / (n - 1)).clamp_min(0).float()

    @property
    def norm(self) -> torch.Tensor:
        """Per-input L2 norm over tokens ‖X_j‖₂ (float32)."""
        return self.sumsq.sqrt().float()


class Metric(_Named):
    """A pruning metric: scores every weight of a linear layer; lower is pruned first.

    Subclasses set ``name``, ``version``, ``Options`` and ``statistics`` (which input
    statistics ``score`` reads: a subset of ``{"sum", "sumsq", "gram"}``; empty for a
    data-free metric, which makes pruning run no forward pass at all) and implement
    ``score``. ``update`` may change the layer after masking (STADE's bias).

    A *solver* metric (``solver = True``, e.g. SparseGPT) implements ``solve``
    instead: it picks the mask with the pattern's ``select`` and updates the weights.
    """

    kind: ClassVar[str] = "metric"
    statistics: ClassVar[frozenset[str]] = frozenset()
    solver: ClassVar[bool] = False

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """Scores of ``weight`` (float32 ``[out, in]``, never modified), same shape."""
        raise NotImplementedError

    def update(self, layer: torch.nn.Module, dense_weight: torch.Tensor, mask: torch.Tensor,
               stats: LayerStats) -> None:
        """Adjust ``layer`` after its weights under ``mask`` were zeroed.

        ``dense_weight`` is the float32 ``[out, in]`` weight before zeroing; ``mask`` is
        True where pruned. The default does nothing.
        """

    def solve(self, weight: torch.Tensor, stats: LayerStats, pattern: Pattern,
              sparsity: float) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict]:
        """Solvers only: return ``(mask, new_weight)`` for float32 ``weight`` ``[out, in]``,
        optionally with a third item, a dict recorded with the layer (e.g. a damping that had
        to be raised)."""
        raise NotImplementedError


class Pattern(_Named):
    """A sparsity pattern: turns scores into a boolean mask (True = pruned).

    ``name`` is the spelling in suites. A parametric pattern (``N:M``) overrides
    ``matches`` and ``from_spec`` so that one class serves every spelling.
    """

    kind: ClassVar[str] = "pattern"
    default_sparsity: ClassVar[float | None] = 0.5
    #: Columns decided independently of the rest of the row (M for N:M), else None.
    group_size: int | None = None

    @classmethod
    def matches(cls, spec: str) -> bool:
        """Whether ``spec`` (as written in a suite) names this pattern."""
        return spec == cls.name

    @classmethod
    def from_spec(cls, spec: str, options: dict[str, Any] | None = None) -> Pattern:
        """Build the pattern a spec names."""
        return cls(options)

    @property
    def spec(self) -> str:
        """The spelling recorded in results."""
        return self.name

    def resolve_sparsity(self, sparsity: float | None) -> float:
        """The target sparsity, checked; None means this pattern's default."""
        if sparsity is None:
            sparsity = self.default_sparsity
        if sparsity is None or not 0.0 <= float(sparsity) < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {sparsity} (pattern {self.spec!r})")
        return float(sparsity)

    def check_shape(self, shape: tuple[int, int]) -> None:
        """Raise ConfigError when a ``[out, in]`` matrix cannot take this pattern."""

    def select(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Boolean mask of ``scores``' shape, True where pruned."""
        raise NotImplementedError


NM_RE = re.compile(r"^(\d+):(\d+)$")


# --- data and evaluation ---------------------------------------------------------


class Dataset(_Named):
    """A text dataset: documents per split, from which windows and eval text are cut.

    Subclasses implement ``documents(split)``; the calibration and evaluation
    protocols live in ``stadebench.data.calibration`` / ``stadebench.evaluation`` and only
    need documents.

    Evaluation attributes (the perplexity protocol reads them):

    - ``join``: separator used when a split is evaluated as one stream (WikiText-2
      joins rows with "\\n\\n", C4 documents with " ").
    - ``eval_split``: the split evaluated when none is named (``test``; C4 has none
      and uses ``validation``).
    - ``eval_documents``: evaluate only the split's first k documents (C4: 1100).
    - ``eval_windows``: evaluate at most k windows of seqlen tokens (C4: 256).
    """

    kind: ClassVar[str] = "dataset"
    join: ClassVar[str] = "\n\n"
    eval_split: ClassVar[str] = "test"
    eval_documents: ClassVar[int | None] = None
    eval_windows: ClassVar[int | None] = None

    def documents(self, split: str) -> Iterable[str]:
        """The split's documents in a fixed order (a ``Sequence`` is indexed, not copied)."""
        raise NotImplementedError

    def unavailable(self) -> str | None:
        """Why this data cannot be had on this machine (None: it can); cheap to call."""
        return None

    def fingerprint(self) -> str:
        """A string identifying the data (recorded with results; used as a cache key)."""
        return f"{self.name}:{self.version}:{self.options.model_dump_json()}"


@dataclass
class Score:
    """One number an evaluator measured.

    Attributes:
        task: what was measured, e.g. ``wikitext2`` or ``arc_easy``.
        name: which score, e.g. ``ppl``, ``acc``, ``acc_norm``.
        value: the score.
        stderr: its standard error when the evaluator knows it.
        higher_is_better: direction of the score.
        details: extra provenance (number of windows/docs, split, seqlen, …).
    """

    task: str
    name: str
    value: float
    stderr: float | None = None
    higher_is_better: bool = True
    details: dict[str, Any] = field(default_factory=dict)


class Evaluator(_Named):
    """Measures an in-memory model (never saved and reloaded) and returns scores."""

    kind: ClassVar[str] = "evaluator"

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, device: torch.device | str | None = None
                 ) -> list[Score]:
        """Evaluate ``model`` as it is now."""
        raise NotImplementedError

    def unavailable(self) -> str | None:
        """Why this evaluation cannot run on this machine (None: it can); cheap to call."""
        return None
