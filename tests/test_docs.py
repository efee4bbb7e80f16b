"""Documentation that cannot drift: every hook has a docs page and a test, every example
file runs, every code block that shows a file shows it as it is, the tutorial's tests
pass and its suite validates, the kit's page lists every conformance rule, and the pages
generated from the code (docs/suites.md from the suite schema, docs/leaderboard.md from the
row schema: ``stadebench.results.reference.PAGES``) are current.

A docs page shows a file with a marker line right before a fenced block::

    <!-- file: docs/examples/metric_plugin.py -->
    ```python
    ...the file, verbatim...
    ```

``python tests/test_docs.py --fix`` rewrites those blocks from the files;
``python -m stadebench.results.reference --write`` (``nox -s docs``) regenerates the pages.
"""

from __future__ import annotations

import re
import runpy
import sys
import tomllib
from pathlib import Path

import pyarrow as pa
import pytest

from stadebench import hookspecs
from stadebench import suite as S
from stadebench.plugins import get_plugins
from stadebench.results.row import SCHEMA
from stadebench.results import reference
from stadebench.suite import reference as suite_reference

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
EXAMPLES = DOCS / "examples"
TUTORIAL = EXAMPLES / "tutorial"
BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\n```(?P<lang>\w*)\n(?P<body>.*?)```\n", re.S)

pytest_plugins = ["pytester"]


def hook_names(module=hookspecs) -> list[str]:
    """Names of the hooks a hookspecs module declares (pluggy marks each spec)."""
    return sorted(name for name, fn in vars(module).items() if hasattr(fn, "stadebench_spec"))


def undocumented(hooks: list[str], docs: Path = DOCS) -> list[str]:
    """Hooks without ``docs/plugins/<hook>.md`` that names the hook and shows a runnable example."""
    missing = []
    for hook in hooks:
        page = docs / "plugins" / f"{hook}.md"
        text = page.read_text(encoding="utf-8") if page.is_file() else ""
        if hook not in text or not any(m["path"].startswith("docs/examples/") for m in BLOCK.finditer(text)):
            missing.append(hook)
    return missing


def untested(hooks: list[str], tests: Path = REPO / "tests") -> list[str]:
    """Hooks that no test module (other than this one) mentions."""
    sources = [p.read_text(encoding="utf-8") for p in tests.glob("test_*.py") if p.name != Path(__file__).name]
    return [hook for hook in hooks if not any(re.search(rf"\b{hook}\b", s) for s in sources)]


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def blocks(page: Path):
    return list(BLOCK.finditer(page.read_text(encoding="utf-8")))


# --- hooks: a page and a test each -----------------------------------------------


def test_hookspecs_are_found():
    assert hook_names() == ["register_allocators", "register_datasets", "register_evaluators", "register_metrics",
                            "register_patterns", "register_reconstructors", "register_refiners"]


def test_plugin_hooks_are_documented():
    assert undocumented(hook_names()) == [], "add docs/plugins/<hook>.md with an example from docs/examples/"


def test_plugin_hooks_have_tests():
    assert untested(hook_names()) == [], "add a test in tests/ that uses the hook"


def test_a_new_hook_without_docs_or_tests_is_caught(tmp_path):
    hooks = hook_names() + ["register_gadgets"]
    assert undocumented(hooks) == ["register_gadgets"]
    assert untested(hooks) == ["register_gadgets"]
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "register_gadgets.md").write_text("# register_gadgets\n\nNo example.\n")
    assert undocumented(["register_gadgets"], tmp_path) == ["register_gadgets"]  # a page needs an example


def test_the_plugins_index_links_every_hook_page():
    index = (DOCS / "plugins" / "index.md").read_text(encoding="utf-8")
    for hook in hook_names():
        assert f"({hook}.md)" in index


# --- code shown in the docs is the code that is tested ----------------------------


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_code_blocks_show_files_verbatim(page):
    for match in blocks(page):
        path = REPO / match["path"]
        assert path.is_file(), f"{page.name} shows {match['path']}, which does not exist"
        assert match["body"] == path.read_text(encoding="utf-8"), (
            f"{page.name}: the block for {match['path']} differs from the file; "
            f"run `python tests/test_docs.py --fix`")


def test_every_example_is_shown_somewhere():
    shown = {m["path"] for page in doc_pages() for m in blocks(page)}
    files = {str(p.relative_to(REPO)) for p in EXAMPLES.rglob("*")
             if p.suffix in {".py", ".toml", ".yaml"} and not any(part.startswith((".", "__")) for part in p.parts)}
    assert files - shown == set()


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_example_runs(example, isolated_plugins, capsys, single_thread):
    runpy.run_path(str(example), run_name="__main__")
    assert capsys.readouterr().out.strip()  # each prints what it did


def test_examples_register_through_their_hook(isolated_plugins):
    """Each example is a plugin for the hook its page documents, and registers a valid item."""
    for hook, file in [("register_metrics", "metric_plugin.py"), ("register_patterns", "pattern_plugin.py"),
                       ("register_datasets", "dataset_plugin.py"), ("register_evaluators", "evaluator_plugin.py"),
                       ("register_allocators", "allocator_plugin.py"), ("register_refiners", "refiner_plugin.py"),
                       ("register_reconstructors", "reconstructor_plugin.py")]:
        module = runpy.run_path(str(EXAMPLES / file))  # not as __main__: just the plugin
        assert hasattr(module[hook], "stadebench_impl"), f"{file} has no @stadebench.hookimpl {hook}"
        items = []
        module[hook](register=items.append)
        kind = hook[len("register_"):-1]
        plugins = get_plugins()
        for cls in items:
            plugins.registries[kind].add(cls, file)
        assert items and plugins.registries[kind].problems == [], plugins.registries[kind].problems


# --- the tutorial ------------------------------------------------------------------


def test_tutorial_tests_pass(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("STADEBENCH_LOAD_PLUGINS", "")
    for name in ("stadebench_wanda_alpha.py", "test_wanda_alpha.py"):
        pytester.makepyfile(**{name[:-3]: (TUTORIAL / name).read_text(encoding="utf-8")})
    from stadebench.testing import make_tiny_model, make_windows
    import stadebench

    stadebench.prune(make_tiny_model(), make_windows(), metric="wanda")  # import transformers before the run
    result = pytester.runpytest("-p", "stadebench.testing", "-p", "no:cacheprovider", "-q",
                                "-W", "ignore::pytest.PytestAssertRewriteWarning")
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and outcomes.get("failed", 0) == 0 and outcomes["passed"] > 30, result.stdout.str()


def test_tutorial_package_declares_the_entry_point():
    project = tomllib.loads((TUTORIAL / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["entry-points"]["stadebench"] == {"wanda-alpha": "stadebench_wanda_alpha"}
    assert "stadebench>=0.1" in project["dependencies"]


def test_tutorial_suite_validates_with_the_plugin_and_fails_without(isolated_plugins, monkeypatch):
    from stadebench.errors import ConfigError
    from stadebench.suite import expand, load_suite

    suite_file = TUTORIAL / "suite.yaml"
    tutorial = (DOCS / "tutorial-metric-plugin.md").read_text(encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_suite(suite_file)
    where, _, message = str(info.value).partition(": ")
    shown = re.search(r"^suite\.yaml:(\d+): (metrics\[\d+\][.\w]*): unknown metric 'wanda-alpha'", tutorial, re.M)
    assert shown and where.endswith(f"suite.yaml:{shown[1]}") and message.startswith(f"{shown[2]}: unknown metric")
    assert "pip install" in message

    monkeypatch.syspath_prepend(str(TUTORIAL))
    import stadebench_wanda_alpha

    get_plugins().register(stadebench_wanda_alpha, name="stadebench_wanda_alpha")
    cells = expand(load_suite(suite_file))
    assert {c.metric_label for c in cells} >= {"wanda-alpha-0.5", "wanda-alpha-2", "wanda"}


def test_the_gradients_example_suite_validates():
    """docs/gradients.md's suite (docs/examples/gradients.yaml): the built-in gradient metrics, a tree option."""
    from stadebench.suite import expand, load_suite

    cells = expand(load_suite(EXAMPLES / "gradients.yaml"))
    assert {c.metric_label for c in cells} == {"dense", "wanda", "gblm", "gblm-l1", "pruner-zero",
                                               "pruner-zero-wanda"}
    assert len(cells) == 1 + 5 * 2  # dense + 5 metrics x 2 patterns


# --- the conformance kit's page ----------------------------------------------------


def test_the_kit_page_lists_every_rule():
    from stadebench.testing import RULES

    page = (DOCS / "plugins" / "testing.md").read_text(encoding="utf-8")
    for rule, text in RULES.items():
        assert f"| `{rule}` | {text} |" in page, f"docs/plugins/testing.md lacks the rule {rule!r}"


# --- reference pages generated from the code -------------------------------------


@pytest.mark.parametrize("page", sorted(reference.PAGES))
def test_generated_pages_are_current(page):
    path = REPO / page
    assert path.is_file() and path.read_text(encoding="utf-8") == reference.PAGES[page](), (
        f"{page} differs from what the code generates; run `{reference.COMMAND}` (or `nox -s docs`) "
        "and commit the result")


def test_the_suite_reference_has_every_field():
    """Every key of every suite section, with its description and default, is on docs/suites.md."""
    page = suite_reference.markdown()
    sections = dict(suite_reference.sections())
    assert set(sections.values()) == {S.Suite, S.ModelSpec, S.MetricSpec, S.PatternSpec, S.AllocationSpec,
                                      S.ExcludeRule, S.CalibrationGrid, S.DatasetSpec, S.EvaluationSpec,
                                      S.StageSpec}
    for path, model in sections.items():
        table = page.split(f'<a id="{suite_reference.anchor(path)}"></a>', 1)[1].split("<a id=", 1)[0]
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
            row = next((line for line in table.splitlines() if line.startswith(f"| `{name}` |")), None)
            assert row and suite_reference.cell_text(info.description) in row, f"{path or 'top level'}: {name}"
    assert suite_reference.RULES in page and suite_reference.CELLS in page
    assert (REPO / suite_reference.EXAMPLE).read_text(encoding="utf-8") in page


def test_a_changed_description_makes_the_page_stale(monkeypatch):
    before = suite_reference.markdown()
    monkeypatch.setattr(S.CalibrationGrid.model_fields["seed"], "description", "A new description.")
    after = suite_reference.markdown()
    assert after != before and ("| `seed` | integer in [0, 9223372036854775807], or a non-empty list of them (one cell each) | `0` | "
                                    "A new description. |") in after


def test_the_column_reference_has_every_column():
    page = reference.columns_markdown()
    for field in SCHEMA:
        doc = field.metadata[b"doc"].decode()
        assert doc and f"| `{field.name}` |" in page and suite_reference.cell_text(doc) in page, field.name
        if pa.types.is_list(field.type) and pa.types.is_struct(field.type.value_type):
            for sub in field.type.value_type:
                assert suite_reference.cell_text(sub.metadata[b"doc"].decode()) in page, f"{field.name}.{sub.name}"


def fix() -> None:
    """Rewrite every file-showing block from its file."""
    for page in doc_pages():
        text = page.read_text(encoding="utf-8")
        new = BLOCK.sub(lambda m: f"<!-- file: {m['path']} -->\n```{m['lang']}\n"
                                  f"{(REPO / m['path']).read_text(encoding='utf-8')}```\n", text)
        if new != text:
            page.write_text(new, encoding="utf-8")
            print(f"updated {page.relative_to(REPO)}")


if __name__ == "__main__" and sys.argv[1:] == ["--fix"]:
    fix()
