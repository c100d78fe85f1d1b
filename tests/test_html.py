"""The Jinja environment of the reports (bids_app/reports/html.py) and its templates."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import jinja2
import pytest

from bids_app.reports import html

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "bids_app" / "reports" / "templates"


def test_every_template_compiles():
    env = html.environment()
    names = env.list_templates()
    assert {"page.html.j2", "participant.html.j2", "group.html.j2"} <= set(names)
    for name in names:
        env.get_template(name)  # a syntax error raises here, not in the middle of a run


def test_every_template_file_is_package_data():
    """A non-editable install gets only the files pyproject.toml's package-data globs match."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["bids_app.reports"]
    files = [
        path.relative_to(TEMPLATES.parent).as_posix()
        for path in TEMPLATES.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert files
    # setuptools globs do not cross "/": compare with the same number of path parts
    unmatched = [
        f for f in files
        if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)
    ]  # fmt: skip
    assert unmatched == []


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('<img src=x onerror="alert(1)">', "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"),
        ("it's A & B", "it&#x27;s A &amp; B"),  # as html.escape, like the f-string pages
    ],
)
def test_values_from_records_are_escaped(text, shown):
    macros = html.environment().get_template("_macros.html.j2").module
    page = str(macros.label_table([("Error", text)]))
    assert f"<td>{shown}</td>" in page
    assert text not in page


def test_badges_and_missing_values():
    macros = html.environment().get_template("_macros.html.j2").module
    assert str(macros.badge("warn")) == '<span class="badge warn">warn</span>'
    table = str(macros.label_table([("Run time", None), ("Steps", "")]))
    assert table.count("<td>n/a</td>") == 2


def test_a_missing_context_name_is_an_error_not_an_empty_page():
    with pytest.raises(jinja2.UndefinedError, match="subject"):
        html.render("participant.html.j2", status="pass")


@pytest.mark.parametrize(
    ("value", "form", "shown"),
    [
        (0.12345, "{:.3f}", "0.123"),
        (0.0012, "{:.1%}", "0.1%"),
        (-0.25, "{:+.3f}", "-0.250"),
        (0, "{:.0f}", "0"),  # zero is a value, not a missing one
        (None, "{:.3f}", "n/a"),
        (math.nan, "{:.3f}", "n/a"),
        (math.inf, "{:.3f}", "n/a"),
    ],
)
def test_format_number(value, form, shown):
    assert html.format_number(value, form) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, None), (0, "0 s"), (119.4, "119 s"), (120, "2.0 min"), ("5400", "90.0 min")],
)
def test_format_seconds(seconds, shown):
    assert html.format_seconds(seconds) == shown
