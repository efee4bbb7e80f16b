"""`stadebench report`: the page, its figures, and the page opened in a real headless Chromium.

The leaderboard is made by `stadebench run` on the tiny model of tests/tinymodel.py: two
metrics at two unstructured sparsities and 2:4, Wanda also under OWL, evaluated by
perplexity and by the diagnostics evaluator (so the diagnostics plots render). The
browser is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages ending in NUL on file descriptors 3 and 4), with the standard library only.
Chromium comes from the system's package manager; `.ci/run` installs it when missing.
Set STADEBENCH_NO_BROWSER=1 to skip the browser test on a machine without one, and
STADEBENCH_SCREENSHOTS=DIR to keep a copy of the screenshot there.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
import types
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from stadebench.results import store as lb
from stadebench.cli import app as stadebench_app
from stadebench.cli import report as report_cli
from stadebench.report import figures, series
from stadebench.report import select as select_rows
from tinymodel import shared_assets, suite_dict, write_suite

_app = typer.Typer()
_app.command("report")(report_cli.report)
_app.command("unused")(lambda: None)  # two commands, so `report` is a subcommand as in the real CLI


def invoke(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000", "STADEBENCH_DEBUG": None},
                              catch_exceptions=False)


def page_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="figure-data">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A tiny leaderboard and its report (`--png` copies the one sweep figure)."""
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("report")
    text = {"name": "text", "options": {"path": str(assets["corpus"])}}
    suite = suite_dict(assets, name="reported", leaderboard=root / "lb",
                       patterns=[{"name": "unstructured", "sparsities": [0.3, 0.5]}, "2:4"],
                       allocations=["uniform", {"name": "owl", "options": {"M": 5, "lambda": 0.08}}],
                       exclude=[{"allocation": "owl", "pattern": "2:4"}, {"allocation": "owl", "metric": "magnitude"}])
    suite["evaluations"].append({"name": "diagnostics", "options": {
        "dataset": text, "seqlen": 16, "max_windows": 4, "metrics": ["magnitude", "wanda"]}})
    path = write_suite(root / "reported.yaml", suite)
    ran = invoke(stadebench_app, "run", path)
    assert ran.exit_code == 0, ran.output
    made = invoke(_app, "report", root / "lb", "-o", root / "out", "--task", "text", "--task", "diagnostics",
                  "--png", root / "sweep.png")
    assert made.exit_code == 0, made.output
    index = root / "out" / "index.html"
    assert made.stdout.strip() == str(index)
    html = index.read_text(encoding="utf-8")
    return types.SimpleNamespace(root=root, suite=path, folder=root / "lb", index=index, html=html,
                                 data=page_data(html), rows=lb.current(lb.read(root / "lb")).to_pylist())


def _sweep(data: dict) -> dict:
    (spec,) = [f for f in data["figures"] if f["kind"] == "sweep"]
    return spec


def check_against_leaderboard(spec: dict, rows: list[dict]) -> None:
    """Every plotted point is the leaderboard value of its cell, and every pruned value is plotted."""
    current = {(r["cell_key"], r["task"], r["score"]): r for r in rows if r["status"] == "ok"}
    plotted = set()
    for line in spec["lines"]:
        for x, y, err, key in zip(line["x"], line["y"], line["stderr"], line["cell_keys"]):
            row = current[(key, spec["task"], spec["score"])]
            assert (row["sparsity"], row["value"], row["stderr"], row["metric"]) == (x, y, err, line["metric"])
            assert row["pattern"] == line["family"] and (row["allocation"] or "uniform") == line["allocation"]
            plotted.add(key)
    pruned = {k for (k, t, s), r in current.items()
              if (t, s) == (spec["task"], spec["score"]) and r["metric"] != "dense"}
    assert plotted == pruned
    (dense,) = spec["dense"]
    assert current[(dense["cell_key"], spec["task"], spec["score"])]["value"] == dense["value"]


# --- the page and its files --------------------------------------------------------------


def test_figures_hold_the_leaderboard_values(reported):
    spec = _sweep(reported.data)
    assert spec["task"] == "text" and spec["score"] == "ppl" and spec["log_y"] is False  # within a factor of 3
    check_against_leaderboard(spec, reported.rows)
    styles = {(line["metric"], line["family"], line["allocation"]): line["style"] for line in spec["lines"]}
    assert styles == {("magnitude", "unstructured", "uniform"): "line", ("wanda", "unstructured", "uniform"): "line",
                      ("wanda", "unstructured", "owl"): "line", ("magnitude", "2:4", "uniform"): "points",
                      ("wanda", "2:4", "uniform"): "points"}
    # matplotlib drew exactly the embedded points (draw() checks this too; here from the outside)
    fig = figures.draw(spec)
    drawn = {line.get_gid(): line.get_xydata().tolist() for line in fig.axes[0].lines if line.get_gid()}
    assert drawn == {f"series-{k}": [[x, y] for x, y in zip(s["x"], s["y"])] for k, s in enumerate(spec["lines"])} | {
        "dense-0": [[0.0, spec["dense"][0]["value"]], [1.0, spec["dense"][0]["value"]]]}


def test_the_drawn_figure_is_checked_against_the_spec():
    spec = {"kind": "sweep", "title": "t", "score": "ppl", "higher_is_better": False, "log_y": False,
            "dense": [{"value": 2.0, "cell_key": None}],
            "lines": [{"legend": "a", "colour_key": "a", "allocation": "uniform", "family": "unstructured",
                       "style": "line", "x": [0.3, 0.5], "y": [3.0, 4.0], "stderr": [None, 0.1]}]}
    figures.draw(spec)
    with pytest.raises(figures.FigureMismatch):
        figures._check([(figures.draw(spec).axes[0].lines[0], [0.3, 0.5], [3.0, 4.5])])


def _line_colours(keys: list[str]) -> dict[str, tuple]:
    lines = [{"legend": k, "colour_key": k, "allocation": "uniform", "family": "unstructured", "style": "line",
              "x": [0.5], "y": [float(i + 3)], "stderr": [None]} for i, k in enumerate(keys)]
    spec = {"kind": "sweep", "title": "t", "score": "ppl", "higher_is_better": False, "log_y": False,
            "dense": [], "lines": lines}
    fig = figures.draw(spec)
    by_gid = {line.get_gid(): line.get_color() for line in fig.axes[0].lines if line.get_gid()}
    return {k: by_gid[f"series-{i}"] for i, k in enumerate(keys)}


def test_a_metric_keeps_its_colour_whatever_else_a_report_shows():
    alone = _line_colours(["wanda", "my-plugin"])
    crowded = _line_colours(["stade", "my-plugin", "magnitude", "wanda", "sparsegpt", "wanda[alpha=2]"])
    assert alone["wanda"] == crowded["wanda"] and alone["my-plugin"] == crowded["my-plugin"]
    assert len(set(crowded.values())) == len(crowded)  # still one colour per line
    # a key whose hashed slot is a built-in's moves to a free one instead of sharing it
    keys = ["magnitude", "wanda", "sparsegpt", "stade", "stade-w", "random"]
    slots = figures.colour_slots(keys + [f"plugin-{i}" for i in range(4)])
    assert sorted(slots.values()) == list(range(10))


def test_a_new_report_removes_the_figures_only_the_last_one_wrote(reported, tmp_path):
    from stadebench.report import build_report

    out = tmp_path / "out"
    build_report(reported.folder, out, task="text")
    first = {p.name for p in (out / "figures").iterdir()}
    assert any(name.endswith(".pdf") for name in first)
    (out / "figures" / "mine.png").write_bytes(b"a file of the user's")
    build_report(reported.folder, out, task="diagnostics")
    second = {p.name for p in (out / "figures").iterdir()}
    assert not (first - {".written"}) & second and "mine.png" in second
    assert sorted(json.loads((out / "figures" / ".written").read_text())) == sorted(second - {"mine.png", ".written"})
    # a damaged or hostile list removes nothing
    (out / "figures" / ".written").write_text(json.dumps(["../index.html", "mine.png.txt", 3]))
    build_report(reported.folder, out, task="diagnostics")
    assert (out / "index.html").exists() and "mine.png" in {p.name for p in (out / "figures").iterdir()}


def test_figure_files_in_three_formats_and_the_png_copy(reported):
    kinds = sorted(f["kind"] for f in reported.data["figures"])
    assert kinds == ["diagnostics-depth", "diagnostics-scatter", "sweep"]
    for spec in reported.data["figures"]:
        assert sorted(spec["files"]) == ["pdf", "png", "svg"]
        data = {ext: (reported.index.parent / path).read_bytes() for ext, path in spec["files"].items()}
        assert data["png"].startswith(b"\x89PNG") and data["pdf"].startswith(b"%PDF") and b"<svg" in data["svg"]
        assert f'data-figure="{spec["slug"]}"' in reported.html
    sweep = _sweep(reported.data)
    assert (reported.root / "sweep.png").read_bytes() == (reported.index.parent / sweep["files"]["png"]).read_bytes()
    scatter = next(f for f in reported.data["figures"] if f["kind"] == "diagnostics-scatter")
    assert [p["title"] for p in scatter["panels"]] == ["magnitude", "wanda"]
    assert all(x > 0 and y > 0 for p in scatter["panels"] for s in p["series"] for x, y in zip(s["x"], s["y"]))
    depth = next(f for f in reported.data["figures"] if f["kind"] == "diagnostics-depth")
    assert {p["title"] for p in depth["panels"]} == {"normed", "internal"}


def test_the_page_fetches_nothing_and_links_every_cell(reported):
    html = reported.html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:|#|figures/)', html)
    assert "http://" not in html and "https://" not in html and "url(" not in html
    targets = set(re.findall(r'href="#(d-[0-9a-f]+)"', html))
    ids = set(re.findall(r'<details class="cell" id="(d-[0-9a-f]+)"', html))
    assert targets and targets <= ids
    assert "prunable layer(s)" in html and "output_mse" in html and "cell_key" in html and "torch_version" in html


def test_the_diagnosed_layers_are_tabled_in_their_cells_details(reported):
    from stadebench.report import page

    diagnosed = [r for r in reported.rows if r["layer_diagnostics"]]
    assert {r["metric"] for r in diagnosed} == {"magnitude", "wanda"}
    for row in diagnosed:
        start = reported.html.index(f'<details class="cell" id="{page.detail_id(row)}">')
        block = reported.html[start:].split('<details class="cell"', 2)[1]  # up to the next cell's details
        table = re.search(r'<table class="layers diagnostics">.*?<tbody>(.*?)</tbody>', block, re.S)
        cells = [re.findall(r"<td[^>]*>(.*?)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", table.group(1))]
        records = row["layer_diagnostics"]
        assert len(cells) == len(records)
        for c, d in zip(cells, records):
            assert c[4] == (f"{row['metric']} (applied)" if d["applied"] else d["candidate"])
            assert c[7] == page.fmt_value(d["relative_measured"]) and c[6] == page.fmt_value(d["relative_predicted"])
            assert (c[9] == "✓") == d["measured_winner"]


def test_filters_keep_the_dense_baseline_and_suite_files_select_their_cells(reported):
    wanda = select_rows(reported.folder, metric="wanda", task="text").to_pylist()
    assert {r["metric"] for r in wanda} == {"dense", "wanda"}
    by_name = select_rows(reported.folder, suite="reported")
    by_file = select_rows(reported.folder, suite=str(reported.suite))
    assert sorted(by_file["cell_key"].to_pylist()) == sorted(by_name["cell_key"].to_pylist())


def test_an_empty_selection_lists_what_exists(reported, tmp_path):
    r = invoke(_app, "report", reported.folder, "-o", tmp_path / "out", "--metric", "nope")
    assert r.exit_code == 2
    message = " ".join(r.stderr.split())
    assert "no results" in message and "metric=nope" in message and "metrics: dense, magnitude, wanda" in message
    assert not (tmp_path / "out").exists()
    r = invoke(_app, "report", tmp_path / "missing", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "no results" in r.stderr
    r = invoke(_app, "report", reported.folder, "-o", tmp_path / "out", "--task", "diagnostics", "--png",
               tmp_path / "x.png")
    assert r.exit_code == 2 and "exactly one" in " ".join(r.stderr.split())  # diagnostics scores have no sweep
    assert not (tmp_path / "x.png").exists()


def test_column_names_split_into_pattern_and_sparsity():
    assert series.split_column("unstructured 0.5") == ("unstructured", 0.5)
    assert series.split_column("2:4 0.5 [myplugin 2]") == ("2:4", 0.5)
    assert series.split_column("N:M(n=2, m=4) 0.5") == ("N:M(n=2, m=4)", 0.5)
    assert series.is_points("2:4") and not series.is_points("unstructured-layer")


# --- a real browser -------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 in the child)."""

    def __init__(self, binary: str, profile: Path, log: Path):
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()
        # above 10, so that putting them on 3 and 4 in the child cannot overwrite one with the other
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child, from_child)]
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "about:blank"]
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, close_fds=False,
                                         preexec_fn=lambda: (os.dup2(high[0], 3), os.dup2(high[1], 4)))
        for fd in (to_child, from_child, *high):
            os.close(fd)
        self.log, self._buffer, self._id, self.events = log, b"", 0, []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not answer in time; its log: {self.log}")
            if select.select([self._in], [], [], left)[0]:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited: {self.log.read_text(errors='replace')[-2000:]}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._message(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def open(self, url: str, width: int = 1280, height: int = 2000) -> str:
        """A new tab showing ``url``; returns its session id once the report says it is ready."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + 30
        while not self.evaluate(session, "window.__reportReady === true"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not set window.__reportReady in 30 s")
            time.sleep(0.05)
        return session

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self, session: str) -> list[str]:
        """Console errors, uncaught exceptions, error log entries and requests other than file: and data:."""
        found = []
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                found.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                found.append(f"log: {p['entry']['text']}")
            elif e["method"] == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:")):
                found.append(f"request: {p['request']['url']}")
        return found

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)


@pytest.fixture(scope="module")
def chromium_binary():
    """Module-scoped and named first, so a skip or a failure comes before the leaderboard is built."""
    if os.environ.get("STADEBENCH_NO_BROWSER") == "1":
        pytest.skip("STADEBENCH_NO_BROWSER=1: the report is not opened in a browser")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("no chromium on PATH: `.ci/run` installs it (apt-get install chromium); set "
                    "STADEBENCH_NO_BROWSER=1 to skip this test")
    return binary


@pytest.fixture
def browser(chromium_binary, tmp_path):
    chromium = Chromium(chromium_binary, tmp_path / "profile", tmp_path / "chromium.log")
    yield chromium
    chromium.close()


def test_the_report_renders_in_a_real_browser(chromium_binary, reported, browser, tmp_path):
    session = browser.open(reported.index.resolve().as_uri())
    shot = tmp_path / "report.png"
    picture = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
    shot.write_bytes(base64.b64decode(picture))
    if os.environ.get("STADEBENCH_SCREENSHOTS"):
        keep = Path(os.environ["STADEBENCH_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep / "report.png")
    print(f"screenshot: {shot}")
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000

    body = browser.evaluate(session, "JSON.stringify(Object.assign({}, document.body.dataset))")
    assert json.loads(body) == {"images": str(len(reported.data["figures"])), "brokenImages": "0",
                                "reportReady": "true"}
    widths = browser.evaluate(session, "Array.from(document.images).map(i => i.naturalWidth)")
    assert len(widths) == 3 and min(widths) > 300
    assert browser.problems(session) == []

    # the points in the page the browser shows are the leaderboard's values
    shown = json.loads(browser.evaluate(session, "document.getElementById('figure-data').textContent"))
    check_against_leaderboard(_sweep(shown), lb.current(lb.read(reported.folder)).to_pylist())

    # a value opens its details (inside the collapsed list under its table)
    opened = browser.evaluate(session, "(() => { const a = document.querySelector('td a[href^=\"#d-\"]'); a.click();"
                                       " return a.getAttribute('href').slice(1); })()")
    deadline = time.monotonic() + 5
    while not browser.evaluate(session, f"(() => {{ const d = document.getElementById('{opened}');"
                                        " return d.open && d.parentElement.closest('details').open; })()"):
        assert time.monotonic() < deadline, "clicking a value did not open its details"
        time.sleep(0.05)
    assert browser.problems(session) == []


def test_the_browser_check_catches_errors_and_broken_images(chromium_binary, reported, browser):
    # without the page's policy, which would (rightly) block the injected script
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", reported.html)
    bad = page.replace("<body>", '<body><img src="figures/missing.png"><img src="https://example.invalid/x.png">'
                       "<script>console.error('boom')</script>", 1)
    (reported.root / "bad.html").write_text(bad, encoding="utf-8")
    session = browser.open((reported.root / "bad.html").resolve().as_uri())
    assert browser.evaluate(session, "document.body.dataset.brokenImages") == "2"
    problems = browser.problems(session)
    assert any("boom" in p for p in problems) and any("example.invalid" in p for p in problems), problems
