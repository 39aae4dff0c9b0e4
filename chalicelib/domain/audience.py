"""A mailing's audience: which clients a filter by operator code and tag selects, and the
index look-ups whose union is exactly those clients."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AudienceQuery:
    """One look-up of an audience: the clients with this operator code and/or tag, or (with
    neither) the clients of one shard of all clients."""

    operator_code: str | None = None
    tag: str | None = None
    shard: int | None = None


@dataclass(frozen=True)
class AudienceFilter:
    """Clients whose operator code is any of `operator_codes` and whose tag is any of `tags`."""

    operator_codes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    def matches(self, operator_code: str, tag: str) -> bool:
        return (not self.operator_codes or operator_code in self.operator_codes) and (
            not self.tags or tag in self.tags
        )

    def selection(self, shards: int) -> list[AudienceQuery]:
        """The look-ups whose union is exactly the clients selected, each client once, in a
        stable order (a cursor names a position in it): one per operator code and tag pair,
        else one per code or per tag, else every shard of all `shards`."""
        codes, tags = sorted(self.operator_codes), sorted(self.tags)
        if codes and tags:
            return [AudienceQuery(operator_code=code, tag=tag) for code in codes for tag in tags]
        if codes:
            return [AudienceQuery(operator_code=code) for code in codes]
        if tags:
            return [AudienceQuery(tag=tag) for tag in tags]
        return [AudienceQuery(shard=shard) for shard in range(shards)]
