"""The local stack's report outbox: each daily report e-mail, also written to a folder.

The local stack adds it after SES (REPORT_OUTBOX_DIR, default build/outbox), so a report can be
read as an `.eml` file and an `.html` page without any mail server.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the stack imports this before the emulator starts; the services load later
    from chalicelib.services.reports import DailyReport

logger = logging.getLogger(__name__)


class ReportOutbox:
    """A report sink writing each e-mail into `folder` (made on first use)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ReportOutbox | None:
        """The outbox REPORT_OUTBOX_DIR names; None when it is unset."""
        folder = environ.get("REPORT_OUTBOX_DIR")
        return cls(Path(folder)) if folder else None

    def deliver(self, report: DailyReport, email: bytes) -> str | None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"daily-report-{report.until:%Y%m%dT%H%M%S}-{report.message_id or 'unsent'}"
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)
        eml, page = self.folder / f"{stem}.eml", self.folder / f"{stem}.html"
        eml.write_bytes(email)
        page.write_text(report.html(), encoding="utf-8")
        logger.info("daily report written to the outbox: %s", eml)
        return None
