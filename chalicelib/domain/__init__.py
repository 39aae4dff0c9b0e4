"""The pure domain core: no I/O, time passed in; one module per concept.

The names below are re-exported so `from chalicelib.domain import X` keeps working.
"""

from chalicelib.domain.audience import AudienceFilter
from chalicelib.domain.client import Client, default_operator_code
from chalicelib.domain.client_import import ClientImport, ImportStatus, RowProblem
from chalicelib.domain.clock import Clock
from chalicelib.domain.mailing import (
    MAILING_HORIZON,
    Action,
    Mailing,
    MailingStatus,
    Message,
    MessageCounts,
    MessageStatus,
    TransitionRefused,
)
from chalicelib.domain.paging import PageOf
from chalicelib.domain.send_window import SendWindow
from chalicelib.domain.text import PLACEHOLDERS, render, template_problems

__all__ = [
    "MAILING_HORIZON",
    "PLACEHOLDERS",
    "Action",
    "AudienceFilter",
    "Client",
    "ClientImport",
    "Clock",
    "ImportStatus",
    "Mailing",
    "MailingStatus",
    "Message",
    "MessageCounts",
    "MessageStatus",
    "PageOf",
    "RowProblem",
    "SendWindow",
    "TransitionRefused",
    "default_operator_code",
    "render",
    "template_problems",
]
