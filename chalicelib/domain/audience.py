"""A mailing's audience: which clients a filter by operator code and tag selects."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AudienceFilter:
    """Clients whose operator code is any of `operator_codes` and whose tag is any of `tags`."""

    operator_codes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    def matches(self, operator_code: str, tag: str) -> bool:
        return (not self.operator_codes or operator_code in self.operator_codes) and (
            not self.tags or tag in self.tags
        )
