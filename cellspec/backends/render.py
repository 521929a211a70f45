"""Jinja environment shared by the back ends (templates hold boilerplate only)."""

from __future__ import annotations

from functools import lru_cache

import jinja2


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cellspec.backends", "templates"),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    env.filters["format_size"] = lambda s: f"_{s}"
    env.filters["format_n"] = lambda s: f"n_{s}"
    return env


def render_template(name: str, ctx: dict) -> str:
    text = environment().get_template(name).render(**ctx)
    # no trailing blanks, exactly one newline at the end
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"
