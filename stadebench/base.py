"""Base classes that plugins subclass: Metric, Refiner, Reconstructor, Pattern, Allocator,
Dataset, Evaluator.

Each has a class-level ``name`` (unique within its kind), a ``version`` that is
recorded with every result, and an ``Options`` pydantic model (unknown keys rejected).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError, NumericalError

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch


class Options(BaseModel):
    """Base of every options model: unknown keys are an error, values are frozen, and no
    number in an option (nested in a list or mapping too) is NaN or infinite."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        where = _non_finite(value)
        if where is not None:
            inner, number = where
            raise PydanticCustomError("finite_number", "{inner}must be a finite number, not NaN or infinite",
                                      {"inner": f"{inner} is {number!r}: " if inner else ""})
        return value


def _non_finite(value: Any, path: str = "", depth: int = 0) -> tuple[str, float] | None:
    """``(where, number)`` of the first NaN or infinite float in ``value``, else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if depth > 50:  # a suite's nesting is bounded when it is read; this guards direct calls
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        step = f"[{key!r}]" if not isinstance(key, str) else f".{key}" if path else key
        found = _non_finite(item, path + step, depth + 1)
        if found is not None:
            return found
    return None


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


INPUT_STATISTICS = frozenset({"sum", "sumsq", "gram", "window_var"})
"""Statistics of a layer's inputs, gathered by forward hooks in the block-wise passes."""
STATISTICS = INPUT_STATISTICS | {"gradient"}
"""Every statistic a plugin may declare: the input statistics and ``gradient`` (per-weight
statistics of the loss's gradient, from a backward pass of the whole model)."""


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
    others are None. Sums are float64, the Gram matrix and the gradient statistics
    float32 (float16 under ``accumulate: released``), all on the device where pruning runs.

    Attributes:
        layer: which layer these statistics belong to.
        count: number of tokens seen.
        sum: Σ_t x_t (shape ``[in]``).
        sumsq: Σ_t x_t² (shape ``[in]``).
        gram: Σ_t x_t x_tᵀ (shape ``[in, in]``).
        m2: Σ_t (x_t − μ)², kept with ``sum`` for an accurate variance.
        windows: number of calibration windows seen (the releases average Σ_t x_t² over
            windows: ``sumsq / windows``).
        window_m2: Σ_w Σ_{t in w} (x_t − μ_w)², each window centred on its own mean (shape
            ``[in]``), with ``window_var``: the spread within windows, which DSnoT reads.
        grad_l1: Σ_w |s·∂L_w/∂W| over calibration windows w (shape ``[out, in]``, like
            the weight), s the metric's ``gradient_scale()``; with ``gradient``.
        grad_l2: sqrt(Σ_w (s·∂L_w/∂W)²), GBLM-Pruner's gradient; with ``gradient``.
    """

    layer: LayerInfo
    count: int = 0
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    windows: int = 0
    grad_l1: torch.Tensor | None = None
    grad_l2: torch.Tensor | None = None
    window_m2: torch.Tensor | None = None

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
    def window_var(self) -> torch.Tensor:
        """Per-input variance within windows (each centred on its own mean), float32."""
        return (self.window_m2 / self.count).float()

    @property
    def norm(self) -> torch.Tensor:
        """Per-input L2 norm over tokens ‖X_j‖₂ (float32)."""
        return self.sumsq.sqrt().float()


@dataclass
class LayerResult:
    """What a metric decided for one linear layer; the engine applies it to the layer.

    The engine zeroes the pruned weights (or writes ``weight``), adds ``bias_delta`` to
    the bias and records ``details`` with the layer in the report.
    """

    mask: torch.Tensor
    """Boolean ``[out, in]``, True where a weight is pruned; the engine counts these as the
    layer's pruned weights and zeroes them whatever ``weight`` holds there."""
    weight: torch.Tensor | None = None
    """The new float32 ``[out, in]`` weight, its kept weights updated (a solver's
    reconstruction), copied into the layer in the layer's dtype; None means the dense
    weight with the mask's weights zeroed."""
    bias_delta: torch.Tensor | None = None
    """Float ``[out]`` tensor added to the layer's bias (a zero bias is created first if the
    layer has none, and the report marks it ``bias_added``); None leaves the bias alone."""
    details: dict[str, Any] = field(default_factory=dict)
    """Recorded with the layer in the report (``LayerReport.details``), e.g. a damping a
    solver had to raise: ``{"percdamp": 0.1}``. JSON-serialisable values only."""


def check_finite(t: torch.Tensor, what: str, layer: str, metric: str | None) -> None:
    """Raise NumericalError when ``t`` holds a NaN or Inf; ``what`` names it in the message
    (``scores``, ``weights``, …), with the layer and, when known, the metric."""
    import torch

    if t.is_floating_point() and t.numel():
        # min and max carry any NaN or Inf: one read, no boolean copy of the tensor
        finite = bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())
    else:
        finite = bool(torch.isfinite(t).all())
    if not finite:
        by = f" (metric {metric})" if metric else ""
        raise NumericalError(f"{what} of layer {layer} contain NaN or Inf{by}")


class Metric(_Named):
    """A pruning metric: decides, for each linear layer, which weights are pruned.

    The engine makes one call per prunable layer, ``prune_layer(weight, stats, pattern,
    sparsity)``, and applies the ``LayerResult`` it returns. Subclasses set ``name``,
    ``version``, ``Options`` and ``statistics``, and implement either

    - ``score`` (most metrics): lower scores are pruned first; the default ``prune_layer``
      checks the scores, lets the pattern pick the mask and asks ``bias_delta`` (default
      None; STADE's mean-compensating bias) for a bias correction; or
    - ``prune_layer`` itself (solvers such as SparseGPT): pick the mask with
      ``pattern.select`` and return the reconstructed weight with it.

    ``statistics`` names the statistics the metric reads (a subset of ``{"sum", "sumsq",
    "gram", "gradient"}``); the engine collects exactly those. ``gradient`` costs one
    forward and backward pass of the whole model per calibration window, at the scale
    ``gradient_scale()`` gives. It is the one declaration of data use: an empty set makes
    the metric ``data_free()``, and pruning then runs no forward pass and needs no
    calibration windows.

    Every method receives the layer's float32 ``[out, in]`` weight, which may be the
    layer's own storage, and ``LayerStats`` shared between layers that read the same
    input: none of them may modify their arguments.
    """

    kind: ClassVar[str] = "metric"
    statistics: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def data_free(cls) -> bool:
        """Whether this metric reads no input statistics (``statistics`` is empty): pruning
        with it runs no forward pass, needs no calibration and knows no layer roles."""
        return not cls.statistics

    def gradient_scale(self) -> float:
        """The scale s of the gradient statistics this metric reads (``"gradient"`` in
        ``statistics``): the engine sums |s·g| and (s·g)², 100 by default as in GBLM-Pruner.
        Cells whose metrics give the same scale share one gradient pass."""
        return 100.0

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """Scores of ``weight`` (float32 ``[out, in]``, never modified), same shape; lower is
        pruned first."""
        raise NotImplementedError

    def bias_delta(self, dense_weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> torch.Tensor | None:
        """What to add to the layer's bias once ``mask``'s weights are zeroed: a float ``[out]``
        tensor, or None (the default) to leave the bias alone.

        ``dense_weight`` is the float32 ``[out, in]`` weight before zeroing (never modified);
        ``mask`` is True where pruned. A layer without a bias gets a zero one first.
        """
        return None

    def prune_layer(self, weight: torch.Tensor, stats: LayerStats, pattern: Pattern,
                    sparsity: float) -> LayerResult:
        """Decide one layer: its mask, and optionally a new weight, a bias delta and details.

        ``weight`` is the float32 ``[out, in]`` dense weight (never modified), ``stats`` the
        layer's input statistics, ``pattern`` and ``sparsity`` what the mask must satisfy.
        The default scores the weight, checks that the scores have its shape and are
        finite (NumericalError otherwise), selects with ``pattern.select`` and returns
        ``LayerResult(mask, None, self.bias_delta(weight, mask, stats))``.
        """
        layer = stats.layer.name
        scores = self.score(weight, stats)
        if scores.shape != weight.shape:
            raise NumericalError(f"metric {self.name} returned scores of shape {tuple(scores.shape)} "
                                 f"for layer {layer} of shape {tuple(weight.shape)}")
        check_finite(scores, "scores", layer, self.name)
        mask = pattern.select(scores, sparsity)
        return LayerResult(mask, None, self.bias_delta(weight, mask, stats))


class Refiner(_Named):
    """A mask refinement stage: changes which weights a metric pruned, never how many.

    ``refine`` gets the layer's current float32 ``[out, in]`` weight (a solver metric's
    update, else the dense one), the metric's mask (True = pruned) and the input statistics,
    and returns a bool mask pruning as many in every row (every ``pattern.group_size``
    group for N:M); the host checks it. ``statistics`` as ``Metric.statistics`` (input
    statistics only); ``supports(pattern)`` says why a pattern cannot be refined, and the
    suite is refused. No argument may be modified.
    """

    kind: ClassVar[str] = "refiner"
    statistics: ClassVar[frozenset[str]] = frozenset()

    def supports(self, pattern: Pattern) -> str | None:
        """Why masks of ``pattern`` cannot be refined (a short reason), or None when they can."""
        return None

    def refine(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats, pattern: Pattern,
               sparsity: float) -> torch.Tensor:
        """The refined boolean ``[out, in]`` mask (True = pruned)."""
        raise NotImplementedError


@dataclass
class Reconstruction:
    """What a reconstructor decided for one layer: ``weight`` (float32 ``[out, in]``, kept
    weights updated, pruned ones zeroed by the host; None: the dense weight), ``bias_delta``
    (float ``[out]`` added to the bias, or None) and ``details`` (JSON, with the layer's report).
    """

    weight: torch.Tensor | None = None
    bias_delta: torch.Tensor | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Reconstructor(_Named):
    """A weight reconstruction stage: new kept weights (and bias) for a fixed mask.

    ``reconstruct`` gets the dense float32 ``[out, in]`` weight, the final mask and the
    input statistics, and returns a ``Reconstruction`` that replaces a solver's update and a
    metric's bias correction. ``statistics`` says what it reads (OBS, ADMM: ``gram``);
    ``memory_bytes`` what one layer needs, so that a suite that cannot fit is refused. No
    argument may be modified.
    """

    kind: ClassVar[str] = "reconstructor"
    statistics: ClassVar[frozenset[str]] = frozenset()

    def memory_bytes(self, rows: int, columns: int) -> int:
        """Extra memory (bytes) reconstructing one ``[rows, columns]`` layer needs."""
        return 0

    def reconstruct(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> Reconstruction:
        """The layer's new weight and bias delta for ``mask``."""
        raise NotImplementedError


class Pattern(_Named):
    """A sparsity pattern: turns scores into a boolean mask (True = pruned).

    ``name`` is the spelling in suites. A parametric pattern (``N:M``) overrides
    ``matches`` and ``from_spec`` so that one class serves every spelling. ``select``
    receives the sparsity of the layer at hand, which an allocator (``Allocator``) may
    set per layer.
    """

    kind: ClassVar[str] = "pattern"
    default_sparsity: ClassVar[float | None] = 0.5
    #: Whether layers may be given sparsities of their own (False for N:M: always N/M).
    per_layer_sparsity: ClassVar[bool] = True
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

    @property
    def fixed_sparsity(self) -> tuple[float, str] | None:
        """``(sparsity, what fixes it)`` for a pattern that admits one sparsity only (N:M:
        ``(N/M, "prunes N of every M weights")``); None when it takes any."""
        return None

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
        """Boolean mask of ``scores``' shape, True where pruned, at this layer's ``sparsity``;
        lower scores are pruned first."""
        raise NotImplementedError


@dataclass
class AllocationLayer:
    """What an allocator sees of one layer to be pruned.

    Attributes:
        layer: where the layer sits (its role is known when statistics were collected).
        module: the linear module itself; read ``weight`` rather than its parameters.
        stats: the dense model's input statistics of the layer (those the allocator
            declared in ``statistics``), None for a data-free allocator.
        transposed: the module stores its weight as ``[in, out]`` (transformers' ``Conv1D``).
    """

    layer: LayerInfo
    module: Any
    stats: LayerStats | None = None
    transposed: bool = False

    @property
    def weight(self) -> torch.Tensor:
        """The dense float32 ``[out, in]`` weight (a copy when the layer is not float32; never modify it)."""
        weight = self.module.weight.t() if self.transposed else self.module.weight
        return weight.detach().float()

    @property
    def numel(self) -> int:
        """Number of weights."""
        return self.module.weight.numel()


class Allocator(_Named):
    """Decides each layer's sparsity from the target (non-uniform, layer-wise sparsity).

    ``allocate(layers, sparsity)`` gets every layer to be pruned, in model order, and
    returns one sparsity per layer. The host checks the answer: each value lies in
    [0, 1), and the mean weighted by each layer's number of weights equals the target,
    so the model as a whole is pruned as asked. ``statistics`` names the input
    statistics of the dense model it reads (as ``Metric.statistics``, but drawn from
    ``INPUT_STATISTICS``: an allocator reads no gradients); they come from one
    dense pass over the calibration windows, shared with one-shot statistics. ``uniform``
    marks an allocator that always returns the target for every layer, which patterns
    with a fixed sparsity (N:M) accept.
    """

    kind: ClassVar[str] = "allocator"
    statistics: ClassVar[frozenset[str]] = frozenset()
    uniform: ClassVar[bool] = False

    @classmethod
    def data_free(cls) -> bool:
        """Whether this allocator reads no input statistics."""
        return not cls.statistics

    def allocate(self, layers: list[AllocationLayer], sparsity: float) -> list[float]:
        """The sparsity of each layer in ``layers`` (same order) for a target ``sparsity``."""
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

    def check(self) -> None:
        """Raise ConfigError for what the options alone show to be wrong (a named local
        file that does not exist); no network, no reading. Called when a suite is
        validated, so that a typo fails before any model is loaded."""

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
        layers: per-layer records behind the score, stored as typed Arrow data with its
            row (``record.DIAGNOSTIC_TYPE``); None for most scores.
        items: what the score averages, one ``{"id", "value", "weight"}`` per window or
            document (an integer ``id`` naming the same item in every cell of the same
            evaluation), for paired comparisons; None when the evaluator does not say.
        aggregate: with ``items``, how ``value`` follows from them: ``mean`` (Σ weight·value
            / Σ weight) or ``exp_mean`` (its exponential: a perplexity).
    """

    task: str
    name: str
    value: float
    stderr: float | None = None
    higher_is_better: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] | None = None
    items: list[dict[str, Any]] | None = None
    aggregate: str | None = None


@dataclass
class CellContext:
    """What an evaluator that sets ``needs_cell = True`` receives besides the pruned model.

    Attributes:
        dense: ``with cell.dense():`` the model holds its dense weights and biases, and
            its pruned ones again afterwards.
        calibration: the suite's calibration windows for this model (LongTensor
            ``[n, seqlen]``), also for a data-free metric; None for the dense baseline.
        metric: the Metric instance that pruned the model; None for the dense baseline.
        pattern: the Pattern instance; None for the dense baseline.
        layers: the engine's ``LayerReport`` of every prunable layer (allocated sparsity,
            left dense or not).
        batch_size: calibration windows per forward pass.
        shared: what one evaluation of the cell computed that another can reuse as it is
            (the pruned model's per-window NLL from fidelity's forward pass), keyed by what
            it is (``evaluation.perplexity.shared_nll_key``).
    """

    dense: Any
    calibration: torch.Tensor | None = None
    metric: Metric | None = None
    pattern: Pattern | None = None
    layers: list[Any] = field(default_factory=list)
    batch_size: int = 8
    shared: dict[Any, Any] = field(default_factory=dict)


class Evaluator(_Named):
    """Measures an in-memory model (never saved and reloaded) and returns scores.

    One that needs more than the pruned model (dense weights, calibration windows, what the
    engine did per layer) sets ``needs_cell = True`` and gets a ``CellContext`` as ``cell``,
    evaluated first; one that can reuse what those computed (``CellContext.shared``) sets
    ``reuses_cell = True`` and gets the context when there is one.
    """

    kind: ClassVar[str] = "evaluator"
    needs_cell: ClassVar[bool] = False
    reuses_cell: ClassVar[bool] = False

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, device: torch.device | str | None = None,
                 cell: CellContext | None = None) -> list[Score]:
        """Evaluate ``model`` as it is now (``cell``: with ``needs_cell``, or ``reuses_cell`` when
        another evaluation of the cell needed one)."""
        raise NotImplementedError

    def unavailable(self) -> str | None:
        """Why this evaluation cannot run on this machine (None: it can); cheap to call."""
        return None

    def check(self) -> None:
        """Raise ConfigError for what the options alone show to be wrong (e.g. a missing
        data file); no network. Called when a suite is validated."""

    def check_model(self, config: Any) -> None:
        """Raise ConfigError when this evaluation cannot run on a model with this
        transformers ``config`` (e.g. windows longer than its context). Called before the
        first cell, and by ``stadebench validate``, with no weights loaded."""

    def fingerprint(self) -> str | None:
        """Identifies the data this evaluation reads (part of every result's key, so
        changed evaluation text re-runs the cells); None when the options say it all."""
        return None


__all__ = ["INPUT_STATISTICS", "STATISTICS", "AllocationLayer", "Allocator", "CellContext", "Dataset", "Evaluator",
           "LayerInfo", "LayerResult", "LayerStats", "Metric", "NM_RE", "Options", "Pattern", "Reconstruction",
           "Reconstructor", "Refiner", "Score", "check_finite"]
