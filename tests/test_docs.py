"""The docs are for users and show what the committed tables hold: the README's headline table is the CSV's, the
README stays short, every linked page exists, and no issue number or session history is left in code or docs."""
import re
from pathlib import Path

from lmmlab.lab.report import BEGIN, END, fmt, readme_headline, report

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_headline_table_is_the_committed_csv():
    text = (ROOT / "README.md").read_text()
    shown = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert shown == readme_headline(ROOT / "results").strip(), "run `lmmlab report` after `lmmlab headline`"


def test_numbers_keep_three_significant_digits_and_their_trailing_zero():
    assert [fmt(x) for x in (23.0, 22.9996, 62.805, 178.29, 1234.5, 0.8125)] == [
        "23.0", "23.0", "62.8", "178", "1,234", "0.812"]


def test_the_readme_is_short_and_its_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_no_issue_numbers_in_code_or_docs():
    places = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "lmmlab").rglob("*.py"),
              *(ROOT / "notebooks").glob("*.ipynb")]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in places
             for m in re.finditer(r"\b[Ii]ssues? \d+", p.read_text())]
    assert not found, found


def test_the_report_names_every_table_with_its_command():
    """REPORT.md is `lmmlab report`'s output: the same lines but for the commit column (a clone's history decides
    it), every table listed, the headline as the CSV holds it."""
    def without_commits(text: str) -> list[str]:
        return [re.sub(r"\| [0-9a-f]{7,}|uncommitted \|", "|", line) for line in text.strip().splitlines()]

    text = report(ROOT / "results")
    for table in (ROOT / "results" / "tables").glob("*.csv"):
        if not table.name.endswith(("_items.csv", "_paired.csv")):
            assert f"`{table.name}`" in text, table.name
    committed = (ROOT / "results" / "REPORT.md").read_text()
    assert without_commits(committed) == without_commits(text), "run `lmmlab report`"


def test_the_readme_python_names_real_functions():
    """Every `from lmmlab... import ...` line of the README's Python block resolves."""
    import importlib

    text = (ROOT / "README.md").read_text()
    block = text.split("```python", 1)[1].split("```", 1)[0]
    for module, names in re.findall(r"^from (lmmlab[\w.]*) import (.+)$", block, flags=re.M):
        for name in names.split(","):
            assert hasattr(importlib.import_module(module), name.strip()), f"{module}.{name.strip()}"
