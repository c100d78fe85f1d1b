"""HTML pages from the Jinja2 templates in ``reports/templates/``: one environment, its filters.

The participant report and the group report gather their data in Python and hand it to
``render(template, **context)``; every tag is in a template. Both pages extend ``page.html.j2``
(head, inline style, header, footer, inline script) and share the macros of ``_macros.html.j2``
(the pass/warn/fail badge, figures). Static text (styles, scripts) lives in
``templates/static/`` and is inlined, so each page stays a single file that needs no network.
"""

from __future__ import annotations

import html
import math
from functools import lru_cache

from bids_app import __version__

NOT_AVAILABLE = "n/a"


def render(template: str, **context) -> str:
    """The page (or fragment) ``template`` filled with ``context``."""
    return environment().get_template(template).render(**context)


@lru_cache(maxsize=1)
def environment():
    """The one Jinja environment: templates from the package, every value escaped, and an
    undefined name an error rather than an empty string (a renamed field must not go quiet)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bids_app.reports", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_escape_as_before,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,  # inlined styles and scripts keep their last line break
    )
    env.filters["number"] = format_number
    env.filters["seconds"] = format_seconds
    env.globals["version"] = __version__
    return env


def format_number(value, form: str = "{:.3f}") -> str:
    """``value`` in ``form`` (a ``str.format`` pattern), or ``n/a`` when missing or not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NOT_AVAILABLE
    return form.format(value)


def format_seconds(value) -> str | None:
    """A duration for people: seconds under two minutes, minutes above; None when unknown."""
    if value is None:
        return None
    value = float(value)
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def _escape_as_before(value):
    """Escape text as the f-string pages did (``html.escape``: ``&quot;``, ``&#x27;``), so that
    pages and the text searched in them keep the same bytes; markup (macros, ``Markup``) passes."""
    from markupsafe import Markup

    if isinstance(value, Markup) or not isinstance(value, str):
        return value
    return Markup(html.escape(value, quote=True))
