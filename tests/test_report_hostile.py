"""A report of a hostile leaderboard (issue #31, classes 4 and 6).

A shared leaderboard's strings are untrusted: labels, model ids and paths, suite, task and
score names, error messages and details here carry script, markup, ``javascript:`` URLs,
text that closes the embedded JSON's ``<script>`` element, matplotlib mathtext (a formula,
an unbalanced ``$``, one that does not parse), SVG-breaking text, control characters, very
long strings, and a ``details`` value that is not JSON (other readers take it as text).
`stadebench report` must render every one as text: exit 0, no payload run in a real
headless Chromium (the machinery of tests/test_report.py), no console error, no request,
a policy that runs no inline script but the page's own, and never a half-written report
folder when a build fails or is killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_report import Chromium, chromium_binary, page_data  # noqa: F401 -- chromium_binary is a fixture

from stadebench.report import figures, page
from stadebench.results import store as lb
from stadebench.results.row import SCHEMA_VERSION, VERSION_KEY

SCRIPT = "<script>window.__pwned=1</script>"
IMG = '"><img src=x onerror="window.__pwned=1">'
JS_URL = "javascript:window.__pwned=1"
CLOSE = "</script><script>window.__pwned=1</script>"
COMMENT = "<!--<script>"  # would put the rest of a JSON <script> element in the "double escaped" state
FORMULA = r"$\frac{1}{0}$"
UNBALANCED = "$x^{"
SVG = "]]></text><script>window.__pwned=1</script>"
CONTROL = "ctl\x00\x01\x07\x1b[31m\x7f\u202e\u2028end"
LONG = "long-" + "W" * 5000
NOT_JSON = '{"a": ' + CLOSE + " not json " + FORMULA
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
MODEL = "/models/" + IMG + "/" + FORMULA  # a local path: titles show its last part


def _row(**over) -> dict:
    row = {"model": JS_URL, "model_source": "local", "metric": "wanda " + FORMULA + IMG, "metric_version": "1",
           "metric_options": {"x": CLOSE}, "pattern": "unstructured" + SVG, "sparsity": 0.5,
           "calib_dataset": SCRIPT, "calib_n": 8, "calib_seqlen": 64, "calib_seed": 0, "sequential": True,
           "batch_size": 4, "calib_accumulate": "float64", "dtype": "float32", "evaluator": "perplexity",
           "evaluator_version": "1", "eval_dataset": "wikitext2", "eval_split": "test", "eval_seqlen": 64,
           "eval_options": {"c": CLOSE, "cm": COMMENT}, "task": "task" + CLOSE + UNBALANCED,
           "score": "ppl" + SCRIPT + FORMULA, "value": 10.0, "higher_is_better": False, "status": "ok",
           "run_id": LONG, "suite": SCRIPT + IMG, "created_at": T0, "device": CONTROL, "saved_path": JS_URL,
           "details": {"note": CLOSE + COMMENT, "m": FORMULA}}
    row.update(over)
    return row


def _dense(**over) -> dict:
    return _row(metric="dense", metric_options={}, pattern=None, sparsity=0.0, calib_dataset=None, calib_n=None,
                calib_seqlen=None, calib_seed=None, sequential=None, batch_size=None, calib_accumulate=None, **over)


def write_hostile(folder: Path) -> None:
    layers = [{"name": "model.layers.0." + SVG, "block": 0, "role": SCRIPT, "rows": 4, "columns": 4, "dense": False,
               "allocated": 0.5, "sparsity": 0.5, "pruned": 8}]
    diagnosed = [{"name": "model.layers.0.mlp" + SVG, "block": b, "role": SCRIPT if b else UNBALANCED,
                  "regime_median": 0.5 + b, "candidate": c, "applied": c == "applied", "bias_corrected": False,
                  "relative_predicted": 0.1 + b / 10, "relative_measured": 0.2 + b / 10, "predicted_winner": True,
                  "measured_winner": False}
                 for b in range(2) for c in ("applied", "magnitude" + FORMULA + CLOSE)]
    # mathtext that does not parse: an even number of '$' around "x^{" (title, legend, axis label)
    broken = {"model": "m", "task": "t" + UNBALANCED, "score": "s" + UNBALANCED}
    lb.write_rows(folder, [
        _dense(value=8.0), _row(value=10.0, layers=layers), _row(sparsity=0.7, value=12.0),
        _row(metric="magnitude" + UNBALANCED, metric_options={}, value=11.0, allocation="owl" + UNBALANCED,
             allocation_options={"k": SCRIPT}),
        _row(sparsity=0.6, status="failed", value=None, error=CLOSE + CONTROL + LONG),
        _dense(model=MODEL, value=5.0), _row(model=MODEL, value=6.0),
        _dense(**broken, value=1.0), _row(**broken, metric="_" + UNBALANCED * 2, metric_options={}, value=2.0),
        _row(evaluator="diagnostics", task="diagnostics", score="layers" + UNBALANCED, value=2.0,
             layer_diagnostics=diagnosed, eval_options={"o": CLOSE + FORMULA + COMMENT})])
    # details that are not JSON, written past Row's normalisation (pandas and `leaderboard` read it as text)
    table = lb._to_table([_row(sparsity=0.8, value=13.0, details=None)])
    i = table.schema.get_field_index("details")
    table = table.set_column(i, table.schema.field(i), pa.array([NOT_JSON], pa.string()))
    pq.write_table(table.replace_schema_metadata({VERSION_KEY: SCHEMA_VERSION}), folder / "raw-notjson.parquet")


def run_cli(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess: this test's sys.path, run away from the checkout (so that
    `-c`'s current folder on sys.path does not pick another copy of the package)."""
    import stadebench as package

    code = (f"import sys, stadebench; assert stadebench.__file__ == {package.__file__!r}, stadebench.__file__; "
            "from stadebench.cli import main; sys.argv[0] = 'stadebench'; sys.exit(main())")
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("STADEBENCH_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd, check=False)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    write_hostile(root / "lb")
    assert lb.read(root / "lb").filter(pc.equal(lb.read(root / "lb")["sparsity"], 0.8))["details"] \
        .to_pylist() == [NOT_JSON]  # the reader keeps it as it is
    done = run_cli("report", root / "lb", "-o", root / "out", cwd=root)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and done.stdout.strip() == str(root / "out" / "index.html")
    assert not done.stderr.strip()  # not even a warning
    html = (root / "out" / "index.html").read_text(encoding="utf-8")
    return root, html


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_no_string_becomes_markup_a_link_or_script(hostile):
    _, html = hostile
    parser = _Tags()
    parser.feed(html)
    scripts = [a for t, a in parser.tags if t == "script"]
    assert scripts == [{"type": "application/json", "id": "figure-data"}, {}]  # the data and the page's own
    assert [t for t, _ in parser.tags if t in ("img", "svg", "iframe", "object", "embed", "form", "base")] == \
        ["img"] * len(page_data(html)["figures"])  # the figures
    for tag, attrs in parser.tags:
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)
        for k in ("href", "src"):
            if k in attrs:
                assert re.match(r"#[\w-]+$|figures/[\w.-]+\.(png|svg|pdf)$|data:image/png;base64,", attrs[k]), attrs
    assert JS_URL in html and "javascript:" not in "".join(a.get("href", "") for _, a in parser.tags)
    # every payload is there as escaped text
    for text in (SCRIPT, IMG, CLOSE, SVG, FORMULA, UNBALANCED, LONG, NOT_JSON):
        assert escape(text) in html, text
    assert "ctl␀␁␇␛[31m␡\u202e\u2028end" in html  # control characters as their pictures


def test_the_embedded_json_holds_every_string_unchanged(hostile):
    _, html = hostile
    raw = re.search(r'<script type="application/json" id="figure-data">(.*?)</script>', html, re.DOTALL).group(1)
    assert not set("<>&") & set(raw)  # nothing in it can close the element, open a comment or read as markup
    data = page_data(html)
    text = json.dumps(data, ensure_ascii=False)
    for payload in (CLOSE, COMMENT, FORMULA, SVG, IMG):
        assert json.dumps(payload, ensure_ascii=False)[1:-1] in text, payload
    assert page.embedded_json({"s": CLOSE + COMMENT + "\u2028&"}) == json.dumps(
        {"s": CLOSE + COMMENT + "\u2028&"}).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026").replace("\\u2028", "\\u2028")
    assert json.loads(page.embedded_json({"s": CLOSE + COMMENT})) == {"s": CLOSE + COMMENT}


def test_the_policy_runs_no_inline_script_but_the_pages_own(hostile):
    import base64
    import hashlib

    _, html = hostile
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html).group(1)
    directives = {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}
    own = "'sha256-" + base64.b64encode(hashlib.sha256(page._SCRIPT.encode()).digest()).decode() + "'"
    assert directives["script-src"] == [own]  # no 'unsafe-inline', no 'unsafe-eval', no 'unsafe-hashes'
    assert not [d for d in directives if d.startswith("script-src-")]  # nothing loosens it for elements or attributes
    assert directives["default-src"] == ["'none'"] and directives["img-src"] == ["data:"]
    assert f"<script>{page._SCRIPT}</script>" in html


def test_details_that_are_not_json_show_as_stored(hostile):
    _, html = hostile
    assert "not valid JSON; shown as stored" in html and f"<pre>{escape(NOT_JSON)}</pre>" in html
    assert page.details({"cell_key": "k", "task": "t", "score": "s", "details": "[1, 2"}, "x").count("[1, 2") == 1


def test_figures_draw_every_label_literally(hostile):
    root, html = hostile
    specs = page_data(html)["figures"]
    assert {s["kind"] for s in specs} == {"sweep", "diagnostics-scatter", "diagnostics-depth"}
    broken = next(s for s in specs if s["kind"] == "sweep" and s["task"] == "t" + UNBALANCED)
    fig = figures.draw(broken)
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_parse_math")) if "$" in t.get_text()]
    assert texts and not any(t.get_parse_math() for t in texts)
    shown = {t.get_text() for t in texts}
    assert f"m · t{UNBALANCED} · s{UNBALANCED}" in shown and f"_{UNBALANCED * 2}" in shown  # '_' kept
    for spec in specs:  # every SVG is well-formed XML with no script and no handler
        svg = ET.parse(root / "out" / spec["files"]["svg"])
        for el in svg.iter():
            assert not el.tag.endswith("script") and not [k for k in el.attrib if k.startswith("on")]
        assert (root / "out" / spec["files"]["pdf"]).read_bytes().startswith(b"%PDF")
    assert figures._short_label(CONTROL) == "ctl\\x00\\x01\\x07\\x1b[31m\\x7f\u202e\u2028end"
    assert len(figures._short_label(LONG, 120)) == 120


# --- no half-written report --------------------------------------------------------------


def test_a_refusal_is_one_error_line_and_no_folder(hostile, tmp_path):
    root, _ = hostile
    for args in (["--model", "nope"], ["--png", tmp_path / "one.png"]):  # nothing selected; three sweeps, not one
        done = run_cli("report", root / "lb", "-o", tmp_path / "out", *args, cwd=root)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == \
            [done.stderr.splitlines()[0]] and "Traceback" not in done.stderr
        assert os.listdir(tmp_path) == []


def test_a_failing_report_leaves_no_report_folder(hostile, tmp_path, monkeypatch):
    from stadebench import report

    root, _ = hostile
    calls = []

    def failing(spec, folder):
        if calls:
            raise RuntimeError("the disk is full")
        calls.append(spec)
        return figures.save(spec, folder)

    monkeypatch.setattr(report, "save", failing)
    with pytest.raises(RuntimeError, match="disk is full"):
        report.build_report(root / "lb", tmp_path / "new" / "out")
    assert calls and not (tmp_path / "new").exists()  # nor the folders made for it
    # over an earlier report: its page and figures stay as they were
    monkeypatch.setattr(report, "save", figures.save)
    report.build_report(root / "lb", tmp_path / "old")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()}
    calls.clear()
    monkeypatch.setattr(report, "save", failing)
    with pytest.raises(RuntimeError):
        report.build_report(root / "lb", tmp_path / "old")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()}
    assert after == before and sorted(os.listdir(tmp_path)) == ["old"]


def test_a_killed_report_leaves_no_report_folder(hostile, tmp_path):
    import stadebench.report

    root, _ = hostile
    started = tmp_path / "started"
    report_module = stadebench.report.__file__
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import stadebench.report as report
        assert report.__file__ == {report_module!r}
        from stadebench.report import figures

        def slow(spec, folder):
            result = figures.save(spec, folder)
            Path({str(started)!r}).write_text("one figure written")
            time.sleep(600)

        report.save = slow
        report.build_report({str(root / "lb")!r}, {str(tmp_path / "out")!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the report did not start"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert not (tmp_path / "out").exists()
    left = [p.name for p in tmp_path.iterdir() if p.name != "started"]
    assert len(left) == 1 and left[0].startswith(".out.report-")  # the killed build's hidden folder
    done = run_cli("report", root / "lb", "-o", tmp_path / "out", cwd=root)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "started"]  # swept by the next report
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


# --- a real browser ----------------------------------------------------------------------


def _navigate(browser: Chromium, url: str) -> str:
    """A new tab showing ``url`` (a page that sets no ready flag, e.g. an SVG), once loaded."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Page.navigate", {"url": url}, session=session)
    deadline = time.monotonic() + 30
    while browser.evaluate(session, "document.readyState + ' ' + location.href") != f"complete {url}":
        assert time.monotonic() < deadline, f"{url} did not load"
        time.sleep(0.05)
    return session


def test_no_payload_runs_in_a_real_browser(chromium_binary, hostile, tmp_path):
    root, html = hostile
    browser = Chromium(chromium_binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        session = browser.open((root / "out" / "index.html").resolve().as_uri())
        assert browser.evaluate(session, "typeof window.__pwned") == "undefined"
        assert browser.evaluate(session, "document.body.dataset.brokenImages") == "0"
        assert browser.evaluate(session, "document.images.length") == len(page_data(html)["figures"]) == 5
        assert browser.problems(session) == []
        # the plotted data the browser reads are the strings as stored
        shown = json.loads(browser.evaluate(session, "document.getElementById('figure-data').textContent"))
        assert shown == page_data(html)
        assert any(CLOSE in f["task"] for f in shown["figures"])
        # every payload is text on the page once its details are open
        text = browser.evaluate(session, "document.querySelectorAll('details').forEach(d => d.open = true);"
                                         " document.body.innerText")
        for payload in (SCRIPT, IMG, JS_URL, CLOSE, SVG, FORMULA, UNBALANCED, NOT_JSON, LONG[:300]):
            assert payload in text, payload
        assert "ctl␀␁␇␛[31m␡" in text
        assert browser.evaluate(session, "document.querySelectorAll('a[href^=\"javascript\"]').length") == 0
        assert browser.problems(session) == []
        # the policy is in force: an inline script added to the page does not run
        browser.evaluate(session, "const s = document.createElement('script'); s.textContent ="
                                  " 'window.__inline = 1'; document.body.appendChild(s); 0")
        assert browser.evaluate(session, "typeof window.__inline") == "undefined"
        # the SVG files open as SVG, and nothing in them runs
        for spec in shown["figures"]:
            svg = _navigate(browser, (root / "out" / spec["files"]["svg"]).resolve().as_uri())
            assert browser.evaluate(svg, "document.documentElement.tagName + ' ' + typeof window.__pwned") == \
                "svg undefined"
            assert browser.problems(svg) == []
    finally:
        browser.close()
