"""The result identity: one typed record of a measurement.

``Row`` is the only definition of a leaderboard row. The Arrow ``SCHEMA``, the fields
hashed into the cell key (``KEY_FIELDS``) and the fields that label a row in tables
(``LABEL_FIELDS``, ``BASELINE_FIELDS``) are all derived from its fields, so a knob added
to the row is stored, keyed and shown without a second list to keep in step.

The key holds everything that changes the number: where the weights came from (source,
resolved Hub commit, GGUF file, tokenizer, a content fingerprint for local files), the
metric and the pattern (name, version, options, supplying distribution), the sparsity,
the calibration (only when the metric reads data) and the evaluation. Library versions,
times and devices are provenance: upgrading torch does not re-run finished cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from ..errors import StadebenchError
from ..util import canonical_json

SCHEMA_VERSION = "7"
VERSION_KEY = "stadebench.schema_version"
STATUSES = ("ok", "failed")


class RecordError(StadebenchError, ValueError):
    """A value that does not fit the row schema."""


_str, _f64, _i32, _i64, _bool = pa.string(), pa.float64(), pa.int32(), pa.int64(), pa.bool_()
_time = pa.timestamp("us", "UTC")

LAYER_TYPE = pa.struct([
    pa.field("name", _str, metadata={"doc": "Module path, e.g. model.layers.3.mlp.down_proj."}),
    pa.field("block", _i32, metadata={"doc": "Index of the decoder block."}),
    pa.field("role", _str, metadata={"doc": "normed (input is a norm's output), internal, or null when unknown."}),
    pa.field("rows", _i32, metadata={"doc": "Output features."}),
    pa.field("columns", _i32, metadata={"doc": "Input features."}),
    pa.field("dense", _bool, metadata={"doc": "Left dense: not selected by targets/ignore."}),
    pa.field("allocated", _f64, metadata={"doc": "Sparsity the layer was asked for (null when left dense)."}),
    pa.field("sparsity", _f64, metadata={"doc": "Realised sparsity: pruned weights / weights."}),
    pa.field("pruned", _i64, metadata={"doc": "Weights pruned."}),
    pa.field("bias_added", _bool, metadata={"doc": "A bias was created for a bias correction."}),
    pa.field("block_mse", _f64, metadata={"doc": "Reconstruction error (MSE) of the layer's block outputs on "
                                                 "the calibration inputs; null when not measured."}),
    pa.field("output_mse", _f64, metadata={"doc": "MSE of this layer's outputs, pruned against dense, on the "
                                                  "calibration inputs (exact, from their Gram matrix); null when "
                                                  "the metric collected none."}),
])
"""One prunable layer of a pruned cell (``Row.layers`` holds a list of them)."""
LAYER_FIELDS = tuple(LAYER_TYPE.field(i).name for i in range(LAYER_TYPE.num_fields))


def _doc(name: str, type_: pa.DataType, doc: str) -> pa.Field:
    return pa.field(name, type_, metadata={"doc": doc})


DIAGNOSTIC_TYPE = pa.struct([
    _doc("name", _str, "Module path of the layer."),
    _doc("block", _i32, "Index of the decoder block."),
    _doc("role", _str, "normed, internal, or null when unknown."),
    _doc("regime_median", _f64, "Median over input channels of |mu_j|/sigma_j (calibration statistics)."),
    _doc("regime_p90", _f64, "90th percentile over input channels of |mu_j|/sigma_j."),
    _doc("output_energy", _f64, "E|Wx|^2 per token of the dense layer on the held-out windows."),
    _doc("candidate", _str, "'applied' (the cell's own decision) or the metric whose mask is diagnosed."),
    _doc("applied", _bool, "Whether this is the decision the cell applied."),
    _doc("bias_corrected", _bool, "Whether the decision moved the error's mean into the bias."),
    _doc("predicted_diagonal", _f64, "Predicted E|e|^2 per token, independent channels, mean term kept."),
    _doc("predicted_diagonal_corrected", _f64, "Predicted E|e|^2, independent channels, mean term removed."),
    _doc("predicted_gram", _f64, "Predicted E|e|^2 from the full covariance (Gram matrix), matching "
                                 "bias_corrected."),
    _doc("predicted", _f64, "The prediction for the decision as applied (Gram form)."),
    _doc("measured", _f64, "Measured E|e|^2 per token on held-out windows, inputs from the dense model."),
    _doc("relative_predicted", _f64, "predicted / output_energy."),
    _doc("relative_measured", _f64, "measured / output_energy."),
    _doc("predicted_winner", _bool, "This candidate has the layer's lowest predicted error."),
    _doc("measured_winner", _bool, "This candidate has the layer's lowest measured error."),
])
"""One (layer, candidate decision) of a ``diagnostics`` evaluation (``Row.layer_diagnostics``)."""


ITEM_TYPE = pa.struct([
    _doc("id", _i64, "The item: a window's index, or lm-eval's doc_id; the same id names the same item in every "
                     "row of the same evaluation."),
    _doc("value", _f64, "The item's value: a window's mean NLL or KL per token, a document's 0/1 outcome or "
                        "negative log-likelihood."),
    _doc("weight", _f64, "Its weight in the score: predicted tokens of a window, 1 for a document."),
])
"""One evaluation item behind a score (``Row.items`` holds a list of them)."""
AGGREGATES = ("mean", "exp_mean")
"""How a score follows from its items: ``mean`` = Σ weight·value / Σ weight; ``exp_mean`` = exp of that."""


GROUPS = ("model", "pruning", "calibration", "evaluation")
"""Where a planned row's field comes from: the model, how it is pruned, its calibration
(filled only when the cell reads data) and the evaluation."""


def _col(type_: pa.DataType, doc: str, role: str = "provenance", *, json: bool = False, label: bool = False,
         baseline: bool = False, source: str | None = None, group: str | None = None, dense: bool = False,
         empty_null: bool = False, counted: bool = True, options_of: str | None = None, always: bool = False) -> Any:
    """A Row field: its Arrow type, what it holds, and which derived lists it joins.

    ``source`` is the field's one name on the way in: a dotted path into the plan's
    ``Sources`` (``cell.calibration.n`` is the suite's ``calibration.n``); the plan fills
    every field that has one, from its ``group``. ``dense``: filled for the dense
    baseline too (other pruning fields are null there); ``empty_null``: an empty value is
    stored as null. ``counted``: a key field that decides "same protocol" against a
    published number (versions, plugins, fingerprints and batch sizes are not);
    ``options_of``: the plugin kind whose options the field holds; ``always``: never null on
    a finished row (so a published protocol must give it).
    """
    meta = {"type": type_, "doc": doc, "role": role, "json": json, "label": label, "baseline": baseline,
            "source": source, "group": group, "dense": dense, "empty_null": empty_null,
            "counted": counted and role == "key", "options_of": options_of, "always": always}
    return field(default=None, metadata=meta)


@dataclass(frozen=True)
class Row:
    """One leaderboard row: one (cell, evaluation) x (task, score), or one failed attempt.

    Fields with role ``key`` identify the measurement; ``value`` fields hold it;
    ``provenance`` fields say how and when it was made. Options are canonical JSON text.
    """

    # --- key: what was measured -------------------------------------------------------
    model: str | None = _col(_str, "Model id as written in the suite: Hub id, local path or asset name.",
                             "key", baseline=True, source="cell.model.id", group="model", always=True)
    model_source: str | None = _col(_str, "Where the weights came from: hub, local, gguf or asset.",
                                    "key", baseline=True, source="identity.source", group="model", counted=False)
    model_revision: str | None = _col(_str, "Resolved Hub commit of the weights (asset: its package "
                                      "pin); null for local files.", "key", baseline=True,
                                      source="identity.revision", group="model")
    model_file: str | None = _col(_str, "GGUF file the weights were read from; null for other formats.",
                                  "key", baseline=True, source="identity.file", group="model")
    model_tokenizer: str | None = _col(_str, "Tokenizer id or path when it is not the model's own.",
                                       "key", baseline=True, source="identity.tokenizer", group="model")
    model_fingerprint: str | None = _col(_str, "Content fingerprint of local weights (sha256 of the "
                                         "files that define the model); changes when they change.",
                                         "key", baseline=True,
                                         source="identity.fingerprint", group="model", counted=False)
    dtype: str | None = _col(_str, "Model dtype while pruning and evaluating, e.g. bfloat16.", "key",
                             baseline=True, source="cell.model.dtype", group="model", always=True)
    metric: str | None = _col(_str, "Pruning metric name; 'dense' for the unpruned baseline.", "key",
                              source="cell.metric", group="pruning", dense=True, always=True)
    metric_version: str | None = _col(_str, "Version the metric plugin declares.", "key",
                                      source="cell.metric_plugin.version", group="pruning", counted=False)
    metric_options: str | None = _col(_str, "Metric options, defaults included, as canonical JSON.", "key",
                                      json=True,
                                      source="cell.metric_options", group="pruning", dense=True, options_of="metric",
                                      always=True)
    metric_plugin: str | None = _col(_str, "Distribution that registered the metric.", "key",
                                     source="cell.metric_plugin.distribution", group="pruning", counted=False)
    pattern: str | None = _col(_str, "Sparsity pattern (unstructured, 2:4, ...); null for dense.", "key",
                               source="cell.pattern", group="pruning")
    pattern_version: str | None = _col(_str, "Version the pattern plugin declares.", "key",
                                       source="cell.pattern_plugin.version", group="pruning", counted=False)
    pattern_options: str | None = _col(_str, "Pattern options as canonical JSON; null when it has none.",
                                       "key", json=True, source="cell.pattern_options", group="pruning",
                                       empty_null=True, options_of="pattern")
    pattern_plugin: str | None = _col(_str, "Distribution that registered the pattern.", "key",
                                      source="cell.pattern_plugin.distribution", group="pruning", counted=False)
    sparsity: float | None = _col(_f64, "Target sparsity in [0, 1) over the pruned layers; 0 for dense.", "key",
                                  source="cell.sparsity", group="pruning", dense=True, always=True)
    allocation: str | None = _col(_str, "Allocator that shared the target out among layers (uniform, owl, "
                                  "...); null for dense.", "key", source="cell.allocation", group="pruning")
    allocation_version: str | None = _col(_str, "Version the allocator plugin declares.", "key",
                                          source="cell.allocation_plugin.version", group="pruning", counted=False)
    allocation_options: str | None = _col(_str, "Allocator options as canonical JSON.", "key", json=True,
                                          source="cell.allocation_options", group="pruning", options_of="allocator")
    allocation_plugin: str | None = _col(_str, "Distribution that registered the allocator.", "key",
                                         source="cell.allocation_plugin.distribution", group="pruning", counted=False)
    refine: str | None = _col(_str, "Refiner applied to the metric's mask (dsnot, ...); null: none.", "key",
                              source="cell.refine", group="pruning")
    refine_version: str | None = _col(_str, "Version the refiner plugin declares.", "key",
                                      source="cell.refine_plugin.version", group="pruning", counted=False)
    refine_options: str | None = _col(_str, "Refiner options as canonical JSON.", "key", json=True,
                                      source="cell.refine_options", group="pruning", empty_null=True,
                                      options_of="refiner")
    refine_plugin: str | None = _col(_str, "Distribution that registered the refiner.", "key",
                                     source="cell.refine_plugin.distribution", group="pruning", counted=False)
    reconstruct: str | None = _col(_str, "Reconstructor that gave the kept weights new values (obs, admm, "
                                   "mean-bias, ...); null: none.", "key", source="cell.reconstruct", group="pruning")
    reconstruct_version: str | None = _col(_str, "Version the reconstructor plugin declares.", "key",
                                           source="cell.reconstruct_plugin.version", group="pruning", counted=False)
    reconstruct_options: str | None = _col(_str, "Reconstructor options as canonical JSON.", "key", json=True,
                                           source="cell.reconstruct_options", group="pruning", empty_null=True,
                                           options_of="reconstructor")
    reconstruct_plugin: str | None = _col(_str, "Distribution that registered the reconstructor.", "key",
                                          source="cell.reconstruct_plugin.distribution", group="pruning",
                                          counted=False)
    layer_targets: str | None = _col(_str, "Regexes (JSON list) selecting the layers to prune; null: all "
                                     "prunable layers.", "key", json=True, label=True,
                                     source="cell.targets", group="pruning", empty_null=True)
    layer_ignore: str | None = _col(_str, "Regexes (JSON list) of layers left dense; null: none.", "key",
                                    json=True, label=True, source="cell.ignore", group="pruning", empty_null=True)
    calib_dataset: str | None = _col(_str, "Calibration dataset name; null when the metric reads no data.",
                                     "key", label=True, source="cell.calibration.dataset.name", group="calibration")
    calib_options: str | None = _col(_str, "Calibration dataset options as canonical JSON.", "key",
                                     json=True, label=True, source="cell.calibration.dataset.options",
                                     group="calibration", options_of="dataset")
    calib_fingerprint: str | None = _col(_str, "The calibration dataset's fingerprint (its version and "
                                         "content).", "key",
                                         source="calibration_fingerprint", group="calibration", counted=False)
    calib_n: int | None = _col(_i32, "Number of calibration windows.", "key", label=True,
                               source="cell.calibration.n", group="calibration")
    calib_seqlen: int | None = _col(_i32, "Tokens per calibration window.", "key", label=True,
                                    source="cell.calibration.seqlen", group="calibration")
    calib_seed: int | None = _col(_i64, "Seed that picked the calibration windows.", "key", label=True,
                                  source="cell.calibration.seed", group="calibration")
    sequential: bool | None = _col(_bool, "True: blocks calibrated on pruned outputs; false: one-shot.",
                                   "key", label=True, source="cell.calibration.sequential", group="calibration")
    batch_size: int | None = _col(_i32, "Calibration windows per forward pass.", "key", label=True,
                                  source="cell.calibration.batch_size", group="calibration", counted=False)
    calib_accumulate: str | None = _col(_str, "How input statistics were summed: float64, or released (the "
                                        "reference releases' float32 running updates).", "key", label=True,
                                        source="cell.calibration.accumulate", group="calibration")
    evaluator: str | None = _col(_str, "Evaluator name, e.g. perplexity or lm-eval.", "key", baseline=True,
                                 source="evaluation.name", group="evaluation", always=True)
    evaluator_version: str | None = _col(_str, "Version the evaluator plugin declares.", "key",
                                         baseline=True,
                                         source="evaluation.resolved.version", group="evaluation", counted=False)
    eval_options: str | None = _col(_str, "Evaluator options (limit, tasks, ...) as canonical JSON.", "key",
                                    json=True, baseline=True,
                                    source="eval_options", group="evaluation", options_of="evaluator", always=True)
    eval_dataset: str | None = _col(_str, "Dataset the evaluator read, e.g. wikitext2 or c4.", "key",
                                    baseline=True, source="eval_dataset", group="evaluation")
    eval_split: str | None = _col(_str, "Split of eval_dataset, e.g. test or validation.", "key",
                                  baseline=True, source="eval_options.split", group="evaluation")
    eval_seqlen: int | None = _col(_i32, "Tokens per evaluation window.", "key", baseline=True,
                                   source="eval_options.seqlen", group="evaluation")
    eval_fingerprint: str | None = _col(_str, "Fingerprint of the data the evaluator reads (its version "
                                        "and content), when it says.", "key", baseline=True,
                                        source="evaluation_fingerprint", group="evaluation", counted=False)
    # --- value ------------------------------------------------------------------------
    task: str | None = _col(_str, "Task of the evaluation (wikitext2, boolq, ...); null if none ran.", "value")
    score: str | None = _col(_str, "Score name (ppl, acc, acc_norm, ...); no ',none' suffix.", "value")
    value: float | None = _col(_f64, "The score.", "value")
    stderr: float | None = _col(_f64, "Standard error of the score, when the evaluator reports one.", "value")
    higher_is_better: bool | None = _col(_bool, "Whether a larger value is a better result.", "value")
    status: str | None = _col(_str, "'ok', or 'failed' when the cell raised (then see error).", "value")
    error: str | None = _col(_str, "The error message of a failed cell.", "value")
    # --- provenance -------------------------------------------------------------------
    run_id: str | None = _col(_str, "Id of the run (one `stadebench run`) that wrote the row.")
    created_at: datetime | None = _col(_time, "When the row was written; the newest write of a key wins.")
    suite: str | None = _col(_str, "Name of the suite the run executed.")
    model_revision_requested: str | None = _col(_str, "Revision as written in the suite (branch, tag, "
                                                "commit), before resolution.",
                                                source="cell.model.revision", group="model")
    stadebench_version: str | None = _col(_str, "stadebench version that produced the row.")
    torch_version: str | None = _col(_str, "torch version that produced the row.")
    transformers_version: str | None = _col(_str, "transformers version that produced the row.")
    lm_eval_version: str | None = _col(_str, "lm-eval version, when installed.")
    metric_plugin_version: str | None = _col(_str, "Version of the distribution that registered the metric.",
                                             source="cell.metric_plugin.distribution_version", group="pruning")
    pattern_plugin_version: str | None = _col(_str, "Version of the distribution that registered the "
                                              "pattern.",
                                              source="cell.pattern_plugin.distribution_version", group="pruning")
    allocation_plugin_version: str | None = _col(_str, "Version of the distribution that registered the "
                                                 "allocator.",
                                                 source="cell.allocation_plugin.distribution_version", group="pruning")
    refine_plugin_version: str | None = _col(_str, "Version of the distribution that registered the refiner.",
                                             source="cell.refine_plugin.distribution_version", group="pruning")
    reconstruct_plugin_version: str | None = _col(_str, "Version of the distribution that registered the "
                                                  "reconstructor.",
                                                  source="cell.reconstruct_plugin.distribution_version",
                                                  group="pruning")
    git_commit: str | None = _col(_str, "Git commit of the stadebench checkout, if it is one.")
    device: str | None = _col(_str, "Device name, e.g. 'NVIDIA H200' or 'cpu (x86_64)'.")
    executor: str | None = _col(_str, "Executor that ran the cell, e.g. local.")
    actual_sparsity: float | None = _col(_f64, "Realised sparsity over the pruned layers (pruned / their "
                                         "weights); layers left dense are in dense_layers.")
    dense_layers: int | None = _col(_i32, "Prunable layers left dense by layer_targets / layer_ignore.")
    prune_seconds: float | None = _col(_f64, "Wall time spent pruning this cell, incl. its own calibration "
                                       "passes (a one-shot statistics pass shared by several cells is in "
                                       "details.prune.shared_statistics).")
    eval_seconds: float | None = _col(_f64, "Wall time spent evaluating.")
    peak_memory_bytes: int | None = _col(_i64, "Peak accelerator memory (CPU: process RSS) during the cell.")
    saved_path: str | None = _col(_str, "Absolute folder the pruned model was saved to (`save:` or `stadebench "
                                  "prune --out`); null when it was not saved.")
    saved_sha256: str | None = _col(_str, "Content hash of the saved folder (save.weights_sha256: config, "
                                    "sparsity.json and weights); null when not saved.")
    details: str | None = _col(_str, "Extra output (per-block errors, task versions, ...) as JSON.",
                               json=True)
    layers: list[dict[str, Any]] | None = _col(pa.list_(LAYER_TYPE), "Every prunable layer of a pruned cell: "
                                               "name, block, role, allocated and realised sparsity, errors "
                                               "(see LAYER_TYPE); null for dense.")
    item_aggregate: str | None = _col(_str, "How value follows from items: mean (sum of weight * value over sum "
                                      "of weight) or exp_mean (exp of that: a perplexity); null without items.")
    items: list[dict[str, Any]] | None = _col(pa.list_(ITEM_TYPE), "Per evaluation item (window or document): "
                                              "id, value, weight (see ITEM_TYPE), what value is an average of; "
                                              "paired comparisons resample them. Null when the evaluator gives none.")
    layer_diagnostics: list[dict[str, Any]] | None = _col(
        pa.list_(DIAGNOSTIC_TYPE), "Per (layer, candidate mask): predicted and measured output error "
        "(see DIAGNOSTIC_TYPE); on the diagnostics evaluation's `layers` row only.")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, normalise(f.name, getattr(self, f.name)))
        if (self.items is None) != (self.item_aggregate is None) or (
                self.item_aggregate is not None and self.item_aggregate not in AGGREGATES):
            raise RecordError(f"items need an item_aggregate, one of {', '.join(AGGREGATES)} (got items="
                              f"{'null' if self.items is None else len(self.items)}, "
                              f"item_aggregate={self.item_aggregate!r})")

    def key(self) -> str:
        """The cell key: sha256 hex of the canonical JSON of the key fields."""
        return cell_key(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> Row:
        """A copy with ``changes`` applied (and normalised)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Every column by name, ``cell_key`` included."""
        return {"cell_key": self.key(), **dataclasses.asdict(self)}


_FIELDS = {f.name: f for f in dataclasses.fields(Row)}

KEY_FIELDS = tuple(n for n, f in _FIELDS.items() if f.metadata["role"] == "key")
"""The fields hashed into ``cell_key``. The evaluation belongs to the key because each
evaluation of a pruned model is skipped or re-run on its own."""
BASELINE_FIELDS = tuple(n for n, f in _FIELDS.items() if f.metadata["baseline"])
"""The key fields a pruned row shares with its dense baseline (model and evaluation)."""
LABEL_FIELDS = tuple(n for n, f in _FIELDS.items() if f.metadata["label"])
"""Key fields beyond model, metric, pattern and sparsity that name a row in tables when they vary."""
JSON_FIELDS = frozenset(n for n, f in _FIELDS.items() if f.metadata["json"])
SOURCES = {n: f.metadata["source"] for n, f in _FIELDS.items() if f.metadata["source"]}
"""Where the plan takes each field from: the field's one name on the way in (a path into
``runner.plan.Sources``), e.g. ``calib_n`` <- ``cell.calibration.n`` (the suite's ``calibration.n``)."""
COUNTED_FIELDS = tuple(n for n, f in _FIELDS.items() if f.metadata["counted"])
"""Key fields that decide "same protocol" against a published number."""
OPTION_FIELDS = {n: f.metadata["options_of"] for n, f in _FIELDS.items() if f.metadata["options_of"]}
"""Fields holding a plugin's options, and the plugin kind that fills their defaults."""


def meta(name: str, key: str) -> Any:
    """The metadata ``key`` of Row field ``name`` (see ``_col``)."""
    return _FIELDS[name].metadata[key]
_STRUCT_FIELDS = {n: tuple(f.metadata["type"].value_type.names) for n, f in _FIELDS.items()
                  if pa.types.is_list(f.metadata["type"])}

SCHEMA = pa.schema(
    [pa.field("cell_key", _str, nullable=False, metadata={"doc": "sha256 hex of the canonical JSON of "
                                                                 "the key fields."})]
    + [pa.field(n, f.metadata["type"], metadata={"doc": f.metadata["doc"]}) for n, f in _FIELDS.items()],
    metadata={VERSION_KEY: SCHEMA_VERSION},
)
"""One row per (cell_key, task, score); every field's ``metadata[b"doc"]`` says what it holds."""


def _plain(value: Any) -> Any:
    """``value`` ready for JSON: numpy scalars as Python numbers, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # a NaN in details must not fail the cell it describes
        return float(value) if math.isfinite(value) else None
    return value


def _json_text(name: str, value: Any) -> str:
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RecordError(f"{name} is not valid JSON: {value!r}") from None
    try:
        return canonical_json(_plain(value))
    except (TypeError, ValueError) as exc:
        raise RecordError(f"{name}: cannot store {value!r} as JSON: {exc}") from None


def normalise(name: str, value: Any) -> Any:
    """One value made ready to store, so that equal settings hash alike (0 and 0.0, JSON text)."""
    if value is None:
        return None
    if name in JSON_FIELDS:
        return _json_text(name, value)
    kind = SCHEMA.field(name).type
    if pa.types.is_floating(kind) and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if pa.types.is_integer(kind):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise RecordError(f"{name} must be an integer, not {value!r}")  # pyarrow would truncate
        return int(value)
    if pa.types.is_timestamp(kind) and isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)  # naive times are taken as UTC
    if pa.types.is_list(kind):
        return _layers(name, value)
    return value


def _layers(name: str, value: Any) -> tuple[dict[str, Any], ...]:
    """Records (per layer, per item) checked against the column's struct (a tuple, so a Row stays hashable)."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, list | tuple):
        raise RecordError(f"{name} must be a list of records, not {type(value).__name__}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise RecordError(f"{name}[{i}] must be a mapping, not {type(entry).__name__}")
        fields = _STRUCT_FIELDS[name]
        unknown = sorted(set(entry) - set(fields))
        if unknown:
            raise RecordError(f"{name}[{i}]: unknown field(s) {unknown}; the fields are {list(fields)}")
        out.append({f: _plain(entry.get(f)) for f in fields})
    return tuple(out)


def cell_key(fields: Mapping[str, Any]) -> str:
    """sha256 hex of the KEY_FIELDS of ``fields`` (others ignored, missing ones null)."""
    key = {name: normalise(name, fields.get(name)) for name in KEY_FIELDS}
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()


__all__ = ["AGGREGATES", "BASELINE_FIELDS", "COUNTED_FIELDS", "DIAGNOSTIC_TYPE", "GROUPS", "ITEM_TYPE",
           "JSON_FIELDS", "KEY_FIELDS", "LABEL_FIELDS", "LAYER_FIELDS", "LAYER_TYPE", "OPTION_FIELDS", "SCHEMA",
           "SCHEMA_VERSION", "SOURCES", "STATUSES", "VERSION_KEY", "RecordError", "Row", "cell_key", "meta",
           "normalise"]
