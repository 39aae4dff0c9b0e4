"""`python -m devstack` (`make run`): the whole service on this machine, no AWS account."""

from __future__ import annotations

import argparse
import sys

from devstack.stack import run

_ENVIRONMENT = """\
environment:
  PORT              API port (default 8000; 0 picks a free one)
  HOST              API address (default 127.0.0.1)
  API_TOKENS        comma-separated accepted bearer tokens (default: one generated per run)
  AWS_ENDPOINT_URL  use this AWS endpoint instead of the embedded emulator
  MOTO_PORT         embedded emulator port on 127.0.0.1 (default 0: a free one)
  TABLE_PREFIX      table and queue name prefix (default sms-local); other service settings
                    apply too (RETRY_BASE_SECONDS, MAX_ATTEMPTS, ...)
  LOG_FORMAT        text (default here: one readable line per event) or json (Lambda's)
  LOCAL_STACK_FILE  where to write how to reach this stack, for
                    `chalice local --stage local` (default build/local-stack.json)

delivery pipeline:
  SCHEDULER_INTERVAL_SECONDS       scheduler tick period (default 10)
  SENDER_BATCH_SIZE                SQS messages per sender invocation, 1-10 (default 10)
  SENDER_POLLERS                   concurrent sender invocations (default 2)
  SEND_VISIBILITY_TIMEOUT_SECONDS  send queue visibility timeout when it is created
                                   (default 60, at least the sender's 60 s timeout)
  SEND_QUEUE_URL, SEND_DLQ_URL, FANOUT_QUEUE_URL
                                   use these queues (default: <TABLE_PREFIX>-send etc.,
                                   created if missing)

IAM:
  LOCAL_IAM                        enforce (default): each function's AWS calls are checked
                                   against its role in the template; off: all allowed
  LOCAL_IAM_TEMPLATE               the template of those roles (default infra/resources.yaml)

gateway:
  SENDER_API_URL, SENDER_API_TOKEN  talk to this SMS gateway (both or neither); without
                                   them a sandbox gateway runs on 127.0.0.1
  SANDBOX_PORT                     sandbox port (default 0: a free one)
  SANDBOX_LATENCY_MS, SANDBOX_ERROR_RATE, SANDBOX_SEED, ...
                                   sandbox faults (see devstack/gateway.py); change
                                   them at runtime with POST <sandbox>/_sandbox/profile

AWS faults (the service's own AWS calls fail as AWS's do under contention and failure):
  AWS_FAULTS                       e.g. conflict=0.15,throttle=0.03,ddb500=0.01,sqs500=0.02,
                                   sqstimeout=0.01,secrets=0.05,seed=7 (default: none; see
                                   devstack/faults.py)
  LAMBDA_TIMEOUTS                  function=seconds,... replacing .chalice/config.json's
                                   timeouts here, e.g. send_messages=5 (default: none)

Prints "SANDBOX <gateway_url>" (with the sandbox), "READY <api_url>" once it serves, and then
the banner (URL, token, links), last;
stops cleanly on Ctrl+C or SIGTERM, printing "AWS_FAULTS_INJECTED <json counts by kind>"
when AWS_FAULTS is set. Exit codes: 2 for a bad setting, 1 for other failures.
"""


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the local stack."""
    parser = argparse.ArgumentParser(
        prog="python -m devstack",
        description="Run the SMS campaign service locally on an embedded AWS emulator.",
        epilog=_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="once it serves, load sample clients and start a mailing to watch",
    )
    args = parser.parse_args(argv)
    return run(demo=args.demo)


if __name__ == "__main__":
    sys.exit(main())
