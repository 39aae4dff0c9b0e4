"""A message's text: the placeholders a mailing may use and their rendering for each client."""

from __future__ import annotations

import string

from chalicelib.domain.client import Client

# Personalisation: the client fields a mailing's text may name, as `{tag}`.
PLACEHOLDERS = ("phone", "operator_code", "tag", "timezone")
# A text that is a valid template, as a JSON Schema pattern (for the API document): literal
# braces doubled, placeholders among PLACEHOLDERS, no format spec or conversion.
TEMPLATE_PATTERN = r"^(?:[^{}]|\{\{|\}\}|\{(?:" + "|".join(PLACEHOLDERS) + r")\})*$"


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
    """The text with its placeholders replaced by `values`. A text that is not a valid
    template (stored before templates existed) is sent as it is."""
    if "{" not in text and "}" not in text:
        return text
    if template_problems(text):
        return text
    return text.format_map(values)


def placeholder_values(client: Client) -> dict[str, str]:
    """What each placeholder stands for in a message to `client`."""
    return {name: getattr(client, name) for name in PLACEHOLDERS}


def personalise(text: str, client: Client) -> str:
    """The text `client` receives: the mailing's text with the client's fields in it."""
    return render(text, placeholder_values(client))
