"""A message's text: placeholders and their rendering per client."""

from __future__ import annotations

import string

# Personalisation: the client fields a mailing's text may name, as `{tag}`.
PLACEHOLDERS = ("phone", "operator_code", "tag", "timezone")


def template_problems(text: str) -> list[str]:
    """What makes `text` unusable as a template (unknown or malformed placeholders)."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        return [f"malformed placeholder ({exc}); write {{{{ and }}}} for literal braces"]
    known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
    problems = []
    for _, field_name, spec, conversion in parts:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS:
            problems.append(f"unknown placeholder {{{field_name}}}; use {known}")
        elif spec or conversion:
            problems.append(f"placeholder {{{field_name}}} takes no format or conversion")
    return problems


def render(text: str, values: dict[str, str]) -> str:
    """The text a client receives: placeholders replaced by the client's fields. A text that
    is not a valid template (stored before templates existed) is sent as it is."""
    if "{" not in text and "}" not in text:
        return text
    if template_problems(text):
        return text
    return text.format_map(values)
