"""Add to the all-time statistics totals every mailing that settled before they existed.

Run once on a stage after deploying the totals (docs/operations.md, "Statistics totals"), with
the stage's settings in the environment (TABLE_PREFIX, AWS_REGION and credentials):

    python -m chalicelib.storage.backfill_totals

It walks every mailing once; a mailing is added only if it is settled and has no settle mark, in
the same conditional transaction as a finish, so running it again (or while mailings finish)
adds nothing twice.
"""

from __future__ import annotations

from chalicelib.settings import Settings
from chalicelib.storage.mailings import DynamoMailingRepository
from chalicelib.storage.models import build_models, connection_for


def main() -> int:
    settings = Settings.from_env()
    repository = DynamoMailingRepository(build_models(settings), connection_for(settings))
    added = repository.backfill_totals()
    print(f"{added} settled mailing(s) added to the statistics totals")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
