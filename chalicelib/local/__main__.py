"""`python -m chalicelib.local` (`make run`): the whole service on this machine, no AWS account."""

from __future__ import annotations

import argparse
import sys

from chalicelib.local.stack import run

_ENVIRONMENT = """\
environment:
  PORT              API port (default 8000; 0 picks a free one)
  HOST              API address (default 127.0.0.1)
  API_TOKENS        comma-separated accepted bearer tokens (default: one generated per run)
  AWS_ENDPOINT_URL  use this AWS endpoint instead of the embedded emulator
  MOTO_PORT         embedded emulator port on 127.0.0.1 (default 0: a free one)
  TABLE_PREFIX      table name prefix (default sms-local); other service settings apply too

Prints "READY <api_url>" once it serves; stops cleanly on Ctrl+C or SIGTERM.
"""


def main(argv: list[str] | None = None) -> int:
    """Parse the (option-less) command line and run the local stack."""
    parser = argparse.ArgumentParser(
        prog="python -m chalicelib.local",
        description="Run the SMS campaign API locally on an embedded AWS emulator.",
        epilog=_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    return run()


if __name__ == "__main__":
    sys.exit(main())
