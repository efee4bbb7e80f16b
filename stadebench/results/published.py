"""Published results as data: tables typed in from papers and READMEs, each with its
citation and its full protocol in stadebench's own knob names (``docs/reproducing.md``).

A published file (``published/*.yaml``) holds ``citation``, optional ``notes``, ``shared``
(fields every row takes unless it gives its own), optional ``templates`` (YAML anchors for
repeated knob sets, not read otherwise) and ``rows``. After merging ``shared`` into it,
every row must give every knob of ``Protocol`` (null where a knob does not apply, e.g. no
calibration for a data-free metric) plus ``id``, ``task``, ``score``, ``value`` and
``higher_is_better``. A row is referred to as ``published:<file stem>:<id>``.

``protocol_diff`` compares two protocols, a leaderboard row's or a published row's, knob
by knob (``PROTOCOL_KNOBS``; options flattened to ``metric_options.percdamp`` and the
like, defaults filled from the registered plugin). Left out are the knobs a paper cannot
state and that do not change the number: versions, plugins, fingerprints, where the
weights came from (``model_source``) and batch sizes (``batch_size``,
``eval_options.batch_size``). A published ``model_revision: null`` means the source pins
no revision: it matches any.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from ..errors import ConfigError
from .row import COUNTED_FIELDS, KEY_FIELDS, OPTION_FIELDS, SOURCES, Row, meta
from ..util import canonical_json, did_you_mean

PREFIX = "published:"
OPTION_KNOBS = OPTION_FIELDS
"""Options knobs, flattened one key at a time, and the plugin kind that fills their defaults."""
NOT_COUNTED = (*(f for f in KEY_FIELDS if f not in COUNTED_FIELDS), "eval_options.batch_size")
"""Key fields left out of "same protocol" (the Row fields declared ``counted=False``): a
source cannot state them and they do not change the number."""
# eval_options keys that are knobs of their own (eval_dataset, eval_split, eval_seqlen) or not counted
_EVAL_OWN = ("dataset", "split", "seqlen", "batch_size")


class PublishedError(ConfigError):
    """A published file that does not fit the schema, or a published row that does not exist."""


class _Unpinned:
    """A published model_revision of null: the source pins none, so any revision matches."""

    def __repr__(self) -> str:
        return "unpinned"


UNPINNED = _Unpinned()


class _Absent:
    """An option key one side of a diff does not have (its plugin has no such option)."""

    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


class Citation(BaseModel):
    """Where the numbers come from: a paper (arXiv id) or a repository at a commit, and the table."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    title: str = Field(min_length=1, description="Title of the paper or README.")
    authors: str | None = Field(None, description="Authors, as the source lists them.")
    arxiv: str | None = Field(None, pattern=r"^\d{4}\.\d{4,5}(v\d+)?$", description="arXiv id, e.g. 2306.11695.")
    repository: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$", description="GitHub owner/name read.")
    commit: str | None = Field(None, pattern=r"^[0-9a-f]{40}$", description="Commit of `repository` read.")
    path: str | None = Field(None, description="File read in `repository`, e.g. README.md.")
    table: str = Field(min_length=1, description="Which table: 'Table 3', or a README section's heading.")

    @model_validator(mode="after")
    def _traceable(self) -> Citation:
        if (self.repository is None) != (self.commit is None):
            raise ValueError("give repository and commit together (the commit the numbers were read at)")
        if self.arxiv is None and self.repository is None:
            raise ValueError("give arxiv, or repository + commit: where a reader can check the numbers")
        return self


Options = dict[str, Any] | None


def _suite_field(path: str) -> FieldInfo | None:
    """The suite schema's field a Row source path reads (``cell.calibration.n`` ->
    ``CalibrationSpec.n``), or None when the value is computed (identity, fingerprints)."""
    from ..suite import Cell, EvaluationSpec

    parts = path.split(".")
    model: Any = {"cell": Cell, "evaluation": EvaluationSpec}.get(parts[0])
    info = None
    for part in parts[1:]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = info.annotation
    return info


def _knob(name: str) -> tuple[Any, Any]:
    """A protocol knob's published type and field, from its Row field: options are mappings,
    regex lists are lists, a knob read from the suite takes that field's type and limits,
    any other the Row's type; null is allowed unless the Row field is ``always`` set."""
    doc = meta(name, "doc")
    if meta(name, "options_of"):
        kind: Any = dict[str, Any]
    elif meta(name, "json"):
        kind = list[str]
    elif (info := _suite_field(SOURCES[name])) is not None:
        kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    else:
        kind = get_type_hints(Row)[name]
    if not meta(name, "always"):
        kind = kind | None
    return kind, Field(description=doc)


def _protocol_model() -> type[BaseModel]:
    """``Protocol``, built from the Row's counted key fields (plus ``eval_joiner``); the
    evaluation's own knobs come before the rest of its options, which are flattened last."""
    names = [n for n in COUNTED_FIELDS if n != "eval_options"]
    fields = {n: _knob(n) for n in names}
    fields["eval_joiner"] = (str | None, Field(description="Text joining the documents of the evaluation stream."))
    fields["eval_options"] = _knob("eval_options")
    return create_model("Protocol", __config__=ConfigDict(extra="forbid", frozen=True, strict=True),
                        __doc__=PROTOCOL_DOC, **fields)


PROTOCOL_DOC = """Every knob that defines a result, under the leaderboard's Row field names (plus
``eval_joiner``, the text between documents of the evaluation stream). All are required;
null where a knob does not apply (dense: no pattern; data-free metric: no calibration).
Built from the Row's counted key fields (``row.COUNTED_FIELDS``): a knob declared there is a
knob here."""

Protocol = _protocol_model()

PROTOCOL_KNOBS = tuple(Protocol.model_fields)
"""The knobs that decide "same protocol", in display order (options are flattened)."""


class PublishedRow(Protocol):
    """One published number with its protocol and citation."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Row id, unique in its file.")
    task: str = Field(min_length=1, description="Task as results name it (wikitext2, ...).")
    score: str = Field(min_length=1, description="Score name (ppl, acc, ...).")
    value: float = Field(description="The number, as printed in the source.")
    stderr: float | None = Field(None, description="Its standard error, when the source gives one.")
    higher_is_better: bool = Field(description="Whether a larger value is better.")
    note: str | None = Field(None, description="Anything a reader of this row must know.")
    replay_model: str | None = Field(None, min_length=1, description="Model a replay runs instead of `model` "
                                     "(e.g. the source's is gone from the Hub): its results are this row's "
                                     "subject, with `model` named as differing.")
    file: str = Field(description="Stem of the file it was read from (set by the loader).")
    citation: Citation = Field(description="The file's citation (set by the loader).")

    @model_validator(mode="after")
    def _in_range(self) -> PublishedRow:
        if not math.isfinite(self.value):
            raise ValueError(f"value: {self.value} is not a finite number")
        if self.stderr is not None and not (math.isfinite(self.stderr) and self.stderr >= 0):
            raise ValueError(f"stderr: {self.stderr} is not a finite number >= 0")
        if self.score == "ppl" and self.value < 1:
            raise ValueError(f"value: a perplexity is at least 1, not {self.value:g}")
        return self

    @property
    def ref(self) -> str:
        """``published:<file>:<id>``: how `stadebench diff` names this row."""
        return f"{PREFIX}{self.file}:{self.id}"

    def subjects(self) -> set[tuple]:
        """The SUBJECT tuples of the leaderboard rows this row is a number of."""
        fields = self.model_dump()
        return {subject({**fields, "model": m}) for m in (self.model, self.replay_model) if m}

    def protocol(self) -> dict[str, Any]:
        """The knobs as a Row-like mapping (model_revision null read as unpinned)."""
        fields = {k: getattr(self, k) for k in PROTOCOL_KNOBS}
        if fields["model_revision"] is None:
            fields["model_revision"] = UNPINNED
        return fields


class PublishedFile(BaseModel):
    """The top level of a published file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    citation: Citation = Field(description="Where the numbers come from.")
    notes: list[str] = Field(default_factory=list, description="What a reader must know: substitutions, "
                                                               "caveats, what the source says of its protocol.")
    shared: dict[str, Any] = Field(default_factory=dict, description="Fields every row takes unless it "
                                                                     "gives its own.")
    templates: dict[str, Any] = Field(default_factory=dict, description="YAML anchors for repeated knob sets.")
    rows: list[dict[str, Any]] = Field(min_length=1, description="The numbers, one per row.")


def _yaml(path: Path) -> Any:
    """The file's YAML read under the suite's limits (size, depth, aliases) and loader
    (safe tags only; `2:4` stays a string, which YAML 1.1 reads as the base-60 number 124)."""
    from ..suite.loading import MAX_BYTES, Loader, check_size

    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise PublishedError(f"{path}: the file is {size:,} bytes, over the limit of {MAX_BYTES:,}; a published "
                                 "table is a few kilobytes")
        text = path.read_text(encoding="utf-8")
        check_size(text, str(path), "published file")
        return yaml.load(text, Loader=Loader)  # noqa: S506 -- a SafeLoader subclass
    except (OSError, UnicodeDecodeError) as exc:
        raise PublishedError(f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        unsafe = isinstance(exc, yaml.constructor.ConstructorError)
        hint = " (a published file holds plain values: no tags)" if unsafe else ""
        raise PublishedError(f"{where}: invalid YAML: {what}{hint}") from None
    except ConfigError as exc:
        raise PublishedError(str(exc)) from None


_ROW_FIELDS = tuple(f for f in PublishedRow.model_fields if f not in ("file", "citation"))


def _problems(where: str, exc: ValidationError, known: Iterable[str]) -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "missing" and e["loc"][0] == "citation":
            lines.append(f"{where}: missing {loc!r}: say where the numbers come from (title, arxiv or "
                         "repository + commit, table)")
        elif e["type"] == "missing":
            lines.append(f"{where}: missing {loc!r} (every knob must be given; null where it does not apply)")
        elif e["type"] == "extra_forbidden":
            names = Citation.model_fields if e["loc"][0] == "citation" else known
            lines.append(f"{where}: unknown key {loc!r}{did_you_mean(str(e['loc'][-1]), names)}")
        else:
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {loc}: {message}" if loc else f"{where}: {message}")
    return "; ".join(lines)


def load_file(path: str | Path) -> list[PublishedRow]:
    """The rows of one published file, checked; PublishedError names the file, row and field."""
    path = Path(path)
    data = _yaml(path)
    if not isinstance(data, dict):
        raise PublishedError(f"{path}: expected a mapping with citation and rows, not {type(data).__name__}")
    try:
        top = PublishedFile.model_validate(data)
    except ValidationError as exc:
        raise PublishedError(_problems(str(path), exc, PublishedFile.model_fields)) from None
    rows, seen = [], set()
    for i, row in enumerate(top.rows):
        where = f"{path}: rows[{i}]" + (f" ({row['id']})" if isinstance(row, dict) and "id" in row else "")
        if not isinstance(row, dict):
            raise PublishedError(f"{where}: expected a mapping, not {type(row).__name__}")
        try:
            parsed = PublishedRow.model_validate({**top.shared, **row, "file": path.stem, "citation": top.citation})
        except ValidationError as exc:
            raise PublishedError(_problems(where, exc, _ROW_FIELDS)) from None
        if parsed.id in seen:
            raise PublishedError(f"{where}: id {parsed.id!r} is used twice in the file")
        seen.add(parsed.id)
        rows.append(parsed)
    return rows


def load_published(folder: str | Path = "published") -> list[PublishedRow]:
    """Every row of the ``*.yaml`` files in ``folder``, by file name then row order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishedError(f"no folder of published results at {folder}")
    return [row for path in sorted(folder.glob("*.yaml")) for row in load_file(path)]


def find_published(rows: Iterable[PublishedRow], ref: str) -> PublishedRow:
    """The row ``published:<file>:<id>`` names (the file may be given with .yaml)."""
    rows = list(rows)
    file, _, rid = ref.removeprefix(PREFIX).partition(":")
    file = file.removesuffix(".yaml")
    files = sorted({r.file for r in rows})
    if file not in files:
        raise PublishedError(f"no published file {file!r}{did_you_mean(file, files)}; files: {', '.join(files)}")
    ids = [r.id for r in rows if r.file == file]
    for row in rows:
        if row.file == file and row.id == rid:
            return row
    raise PublishedError(f"no row {rid!r} in published file {file!r}{did_you_mean(rid, ids)}; rows: "
                         + ", ".join(ids[:12]) + (" …" if len(ids) > 12 else ""))


# --- protocols ------------------------------------------------------------------------


def _plugin_class(kind: str, name: str) -> Any:
    from ..plugins import get_plugins

    registry = get_plugins().registries[kind]
    return registry.get(name).cls


def filled_options(kind: str, name: str | None, options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``options`` with the defaults of the plugin ``kind``/``name`` filled in, canonical;
    as given when the plugin is unknown here or refuses them."""
    if options is None:
        return None
    given = json.loads(canonical_json(dict(options)))
    if name is None:
        return given
    try:
        cls = _plugin_class(kind, name)
        plugin = cls.from_spec(name, given) if kind == "pattern" else cls(given)
        full = plugin.options.model_dump(mode="json")
    except Exception:  # noqa: BLE001 -- an unknown plugin or bad options: compare what was written
        return given
    return json.loads(canonical_json({**full, **{k: v for k, v in given.items() if k not in full}}))


def _joiner(dataset: str | None, options: Mapping[str, Any] | None) -> str | None:
    if dataset is None:
        return None
    try:
        return _plugin_class("dataset", dataset)(dict(options or {})).join
    except Exception:  # noqa: BLE001 -- not registered here: the joiner is unknown
        return None


def _loaded(value: Any) -> Any:
    """JSON text (as leaderboard rows store options) read back; other values as they are."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def protocol_of(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The protocol of a leaderboard row, a ``PublishedRow.protocol()`` or a Row-like mapping:
    ``PROTOCOL_KNOBS`` with options flattened (``metric_options.percdamp``) and defaults filled."""
    out: dict[str, Any] = {}
    if "eval_joiner" not in fields:  # a leaderboard row: the joiner is the registered dataset's
        fields = {**fields, "eval_joiner": _joiner(fields.get("eval_dataset"), _eval_dataset_options(fields))}
    for knob in PROTOCOL_KNOBS:
        value = fields.get(knob)
        if knob in OPTION_KNOBS:
            owner = {"calib_options": "calib_dataset", "eval_options": "evaluator"}.get(knob, knob[:-8])
            name, options = fields.get(owner), _loaded(value)
            if options is None and name is not None and name != "dense":
                options = {}  # a plugin's options left out are its defaults, as a suite reads them
            options = filled_options(OPTION_KNOBS[knob], name, options)
            if knob == "eval_options" and options is not None:
                dataset = options.get("dataset")
                options = {k: v for k, v in options.items() if k not in _EVAL_OWN}
                if isinstance(dataset, dict):
                    own = filled_options("dataset", dataset.get("name"), dataset.get("options") or {})
                    options.update({f"dataset.{k}": v for k, v in own.items()})
            for key, v in sorted((options or {}).items()):
                out[f"{knob}.{key}"] = v
        elif knob in ("layer_targets", "layer_ignore"):
            out[knob] = _loaded(value)
        elif knob == "sparsity" and value is not None:
            out[knob] = float(value)
        else:
            out[knob] = value
    return out


def _eval_dataset_options(fields: Mapping[str, Any]) -> dict[str, Any]:
    options = _loaded(fields.get("eval_options")) or {}
    dataset = options.get("dataset") if isinstance(options, dict) else None
    return dict(dataset.get("options") or {}) if isinstance(dataset, dict) else {}


def _same(a: Any, b: Any) -> bool:
    if a is UNPINNED or b is UNPINNED:
        return True
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return canonical_json(a) == canonical_json(b)


def protocol_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(knob, a value, b value)`` for every protocol knob on which ``a`` and ``b`` differ
    (each a leaderboard row, a ``PublishedRow.protocol()`` or a mapping like them); [] when
    they share the protocol. An option key only one side has is ABSENT on the other."""
    pa, pb = protocol_of(a), protocol_of(b)
    names = list(pa) + [k for k in pb if k not in pa]
    order = {k: i for i, k in enumerate(PROTOCOL_KNOBS)}
    names.sort(key=lambda k: (order[k.split(".", 1)[0]], k))
    return [(k, pa.get(k, ABSENT), pb.get(k, ABSENT)) for k in names if not _same(pa.get(k), pb.get(k))
            or (k in pa) != (k in pb)]


def uncounted_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The NOT_COUNTED fields on which two leaderboard rows differ (shown, never compared)."""
    def get(row: Mapping[str, Any], name: str) -> Any:
        if name == "eval_options.batch_size":
            options = _loaded(row.get("eval_options"))
            return options.get("batch_size") if isinstance(options, dict) else None
        return row.get(name)

    return [(n, get(a, n), get(b, n)) for n in NOT_COUNTED if not _same(get(a, n), get(b, n))]


def show_value(value: Any) -> str:
    """A knob's value as tables print it: ``unpinned``, ``null``, strings with escapes visible."""
    if value is UNPINNED:
        return "unpinned (any)"
    if value is ABSENT:
        return "—"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value if value.isprintable() and value.strip() == value and value else json.dumps(value)
    return canonical_json(value)


SUBJECT = ("model", "metric", "pattern", "sparsity", "allocation", "refine", "reconstruct", "task", "score")
"""What a published row is a number of: the leaderboard rows with these fields equal are
compared to it when their protocol matches, and named as differing when it does not. The
stages are part of it: a paper's "Wanda + DSnoT" is a number of ``wanda → dsnot`` cells, and
is never set beside a plain ``wanda`` cell as "protocol differs in refine"."""


def subject(fields: Mapping[str, Any]) -> tuple:
    """The SUBJECT fields of a row (sparsity as a float)."""
    return tuple(float(fields.get(f) or 0.0) if f == "sparsity" else fields.get(f) for f in SUBJECT)


@dataclass
class Comparison:
    """A published row beside a leaderboard row of its subject: compared when their protocols
    match (``differs`` empty), else the knobs that differ, ``(knob, ours, paper)``."""

    published: PublishedRow
    ours: dict[str, Any]
    differs: list[tuple[str, Any, Any]]

    @property
    def compared(self) -> bool:
        """Whether the protocols match, so the two numbers may be compared."""
        return not self.differs

    @property
    def relative(self) -> float | None:
        """ours / paper - 1 when compared (None otherwise, or when either is missing or the paper's is 0)."""
        value = self.ours.get("value")
        if not self.compared or value is None or not self.published.value:
            return None
        return value / self.published.value - 1.0


def compare(rows: Iterable[Mapping[str, Any]], published: Iterable[PublishedRow]) -> list[Comparison]:
    """Every published row against the ok leaderboard ``rows`` of its subject (SUBJECT,
    ``replay_model`` included): one Comparison per row whose protocol matches exactly, or,
    when none does, one with the row that differs in the fewest knobs. Published rows with
    no subject in ``rows`` are left out."""
    by_subject: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok" and row.get("value") is not None:
            by_subject.setdefault(subject(row), []).append(row)
    out = []
    for paper in published:
        candidates = [r for s in sorted(paper.subjects(), key=str) for r in by_subject.get(s, [])]
        if not candidates:
            continue
        diffs = [(protocol_diff(r, paper.protocol()), r) for r in candidates]
        exact: dict[float, Mapping[str, Any]] = {}
        # one per value: cells that differ only in what is not counted (a version) say the same
        for d, r in sorted(diffs, key=lambda dr: str(dr[1].get("created_at"))):
            if not d:
                exact[r["value"]] = r
        if exact:
            out += [Comparison(paper, dict(r), []) for r in exact.values()]
        else:
            differs, closest = min(diffs, key=lambda dr: len(dr[0]))
            out.append(Comparison(paper, dict(closest), differs))
    return out


__all__ = ["ABSENT", "NOT_COUNTED", "OPTION_KNOBS", "PREFIX", "PROTOCOL_KNOBS", "SUBJECT", "UNPINNED", "Citation",
           "Comparison", "Protocol", "PublishedError", "PublishedFile", "PublishedRow", "compare", "filled_options",
           "find_published", "load_file", "load_published", "protocol_diff", "protocol_of", "show_value", "subject",
           "uncounted_diff"]
