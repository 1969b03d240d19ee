"""The report page's templates (``templates/*.html.j2``, shipped in the package and read through
importlib, so that an installed wheel finds them) and the one Jinja2 environment that renders them.

Autoescape is on, and every ``{{ value }}`` goes through the report's own :func:`~.format.escape`
first (the environment's ``finalize``): it is stricter than Jinja2's default escaping, which leaves
U+2028/U+2029 in the page. Only values that the code itself built and escaped bypass it, as
:class:`~markupsafe.Markup`: numbers as :func:`~.format.number_html` writes them (the ``number``
filter), the explorer's data as :func:`~.format.script_json` writes it and the package's own CSS and
JavaScript (:func:`asset`); each such place in the templates says why.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from ..errors import QlocError
from .format import escape, number_html, script_json

PAGE = "report.html.j2"


def _escaped(value: Any) -> Any:
    """Every ``{{ value }}`` as HTML, by the report's escape; Markup (built and escaped by the code)
    as it is."""
    return value if hasattr(value, "__html__") else Markup(escape(value))


def _number(value: Any) -> Markup:
    # number_html escapes the number's text and adds only <sup> tags of its own.
    return Markup(number_html(value))


def embedded_json(data: Any) -> Markup:
    """``data`` for a ``<script type="application/json">`` element: :func:`script_json` writes every
    ``<``, ``>`` and ``&`` as a \\u escape, so no text from the data can end the element."""
    return Markup(script_json(data))


def asset(name: str) -> Markup:
    """The package's own ``assets/NAME`` (the page's CSS or JavaScript) for a ``<style>`` or
    ``<script>`` element; refused where it holds a closing tag that would end the element early."""
    text = (resources.files("qloc.report") / "assets" / name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():
        raise QlocError(f"the report's asset {name!r} holds a closing </script> or </style> tag")
    return Markup(text)


@cache
def environment() -> Environment:
    """Templates from the package (``PackageLoader`` reads them through importlib, from a source
    tree or an installed wheel); a name the template uses but the code does not give is an error."""
    env = Environment(
        loader=PackageLoader("qloc.report", "templates"),
        autoescape=True,
        finalize=_escaped,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["number"] = _number
    return env


def render_page(**context: Any) -> str:
    """The report's page, :data:`PAGE` rendered with ``context``."""
    return environment().get_template(PAGE).render(**context)
