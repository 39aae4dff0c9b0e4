"""Parts and cost of a text over an audience, before anything is sent.

The audience is read as the preview reads it (a bounded read, `ClientRepository.summarize`):
the clients read give the values their messages depend on (tag, timezone, operator code), and
the total is scaled from them like the count. Tags the filter names are possible values even
when no client read has them yet, so they bound a message's length too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from chalicelib.domain import AudienceFilter
from chalicelib.domain.sms_parts import (
    ClientValues,
    PartsEstimate,
    Prices,
    estimate_parts,
    mixed,
    too_many_parts,
)
from chalicelib.errors import ValidationFailed
from chalicelib.settings import Settings
from chalicelib.storage.clients import AudienceSummary, ClientRepository

logger = logging.getLogger(__name__)

# Clients sampled for a mailing's estimate: none is returned, only counted.
_NO_SAMPLE = 0


def prices_of(settings: Settings) -> Prices | None:
    """What a message part costs (PRICE_PER_PART...); None when no price is configured."""
    if settings.price_per_part is None:
        return None
    return Prices(
        settings.price_per_part, settings.price_currency, dict(settings.price_per_part_by_operator)
    )


def possible_values(summary: AudienceSummary, audience: AudienceFilter) -> list[ClientValues]:
    """Values the audience's clients may have that the read did not meet: each tag the filter
    names, with the longest timezone seen (or the shortest there is) and a code it names."""
    timezones = [v.timezone for v in summary.values] or ["UTC"]
    timezone = max(timezones, key=len)
    code = audience.operator_codes[0] if audience.operator_codes else "000"
    seen_tags = {v.tag for v in summary.values}
    return [ClientValues(code, tag, timezone) for tag in audience.tags if tag not in seen_tags]


def parts_over(
    text: str, summary: AudienceSummary, audience: AudienceFilter, prices: Prices | None
) -> PartsEstimate:
    """The parts (and cost, if priced) of `text` sent to the audience `summary` describes."""
    return estimate_parts(
        text,
        summary.values,
        messages=max(summary.count - summary.opted_out, 0),
        approximate=summary.approximate,
        possible=possible_values(summary, audience),
        prices=prices,
    )


class PartsCounter:
    """A mailing's parts and cost, and its `max_parts` rule."""

    def __init__(
        self, clients: ClientRepository, prices: Prices | None, max_parts_default: int
    ) -> None:
        self._clients = clients
        self._prices = prices
        self.max_parts_default = max_parts_default

    def for_mailing(
        self,
        texts: Sequence[tuple[str, float]],
        audience: AudienceFilter,
        max_parts: int,
        *,
        field: str = "body.text",
    ) -> PartsEstimate:
        """The estimate over `audience` of a mailing whose texts each go to a share of it (one
        text with share 1.0; A/B variants with their weights' shares, less the holdout);
        ValidationFailed (on `field`, or `body.variants[i].text` for several texts) when some
        client's message would take more than `max_parts` parts, naming the client field that
        makes it long when one does."""
        summary = self._clients.summarize(audience, _NO_SAMPLE)
        values = [*summary.values, *possible_values(summary, audience)]
        for index, (text, _) in enumerate(texts):
            problem = too_many_parts(text, values, max_parts)
            if problem:
                where = field if len(texts) == 1 else f"body.variants[{index}].text"
                raise ValidationFailed(
                    f"the text is too long: {problem}",
                    [{"field": where, "message": problem, "type": "too_many_parts"}],
                )
        return mixed(
            [(parts_over(text, summary, audience, self._prices), share) for text, share in texts]
        )
