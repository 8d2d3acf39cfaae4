"""The documentation: generated pages equal what their sources render, every benchmark result
names its commit, and a missing result or an undocumented setting stops the build."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docs import generate
from services.config import env_name, settings

ROOT = Path(__file__).resolve().parent.parent


def test_committed_pages_equal_what_the_generator_renders() -> None:
    """The benchmark tables (and the other generated pages) are what `python -m docs.generate`
    renders from the committed JSON and code; a hand edit or a re-measured JSON without a
    regenerated page fails here."""
    for page, render in generate.PAGES.items():
        assert (generate.DOCS / page).read_text() == render(), f"docs/{page} is stale: run python -m docs.generate"
    assert generate.stale() == []


def test_every_benchmark_result_names_the_commit_it_measured() -> None:
    files = sorted(generate.RESULTS.glob("*.json"))
    assert files
    for path in files:
        sha = json.loads(path.read_text()).get("commit", {}).get("sha")
        assert isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{40}", sha), path.name
    rendered = {name for name, *_ in generate.BENCHMARKS}
    assert rendered == {p.stem for p in files}, "every result file has a table and every table a file"


def test_a_benchmark_table_shows_its_json_figures() -> None:
    """Tables are rendered from the JSON, not typed: a changed figure changes the page."""
    record = generate.result("peers_quick")
    page = generate.render_benchmarks()
    assert f"{record['live_vs_best_peer']:.3f}x" in page
    assert f"`{record['commit']['sha'][:7]}`" in page
    record["live_vs_best_peer"] = 9.876
    assert "9.876x" in generate._peers(record)


def test_a_missing_or_commitless_result_fails_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate, "RESULTS", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"embedding_store\.json: missing"):
        generate.render_benchmarks()
    for name, *_ in generate.BENCHMARKS:
        (tmp_path / f"{name}.json").write_text(json.dumps({"benchmark": name}))
    with pytest.raises(ValueError, match="names no commit"):
        generate.render_benchmarks()


def test_mkdocs_build_fails_on_a_stale_page(tmp_path: Path) -> None:
    """The strict build runs the generator's check in its hook: a page edited by hand is refused."""
    copy = tmp_path / "repo"
    for rel in ["docs", "services", "trainer", "retrieval", "ranking", "embedding_store", "proto", "bench"]:
        shutil.copytree(ROOT / rel, copy / rel, ignore=shutil.ignore_patterns("__pycache__", "*.png"))
    for name in ("mkdocs.yml", "README.md"):  # the README's figures block is generated too
        shutil.copy(ROOT / name, copy / name)
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")]
    ok = subprocess.run(mkdocs, cwd=copy, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    page = copy / "docs" / "benchmarks.md"
    page.write_text(page.read_text().replace("x (recent popularity)", "x (hand-edited)"))
    stale = subprocess.run(mkdocs, cwd=copy, capture_output=True, text=True)
    assert stale.returncode != 0 and "docs/benchmarks.md" in stale.stderr


def test_configuration_reference_lists_every_setting_with_its_variable() -> None:
    page = (generate.DOCS / "reference" / "configuration.md").read_text()
    for path, _f, _kind in settings():
        assert f"| `{path}` | `{env_name(path)}`" in page, path


def test_a_setting_without_a_description_stops_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.config import ShardConfig

    monkeypatch.setattr(ShardConfig, "__doc__", "A shard.\n\nArgs:\n    host: interface to bind.\n")
    with pytest.raises(ValueError, match=r"shard\.port: no description"):
        generate.render_configuration()


def test_field_docs_reads_continuations_and_shared_entries() -> None:
    class Sample:
        """Something.

        Args:
            a, b: first line
                and its continuation.
            c: alone.

        Raises:
            d: not a field.
        """

    assert generate.field_docs(Sample) == {
        "a": "first line and its continuation.",
        "b": "first line and its continuation.",
        "c": "alone.",
    }


def test_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    for target in re.findall(r"\]\(((?:docs/|CONTRIBUTING)[^)#]*)", readme):
        assert (ROOT / target).exists(), target
