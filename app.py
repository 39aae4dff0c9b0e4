"""The Chalice application: registers the blueprints; the logic lives in chalicelib."""

import os

from chalice import Chalice

# `chalice local --stage local` (its stage sets LOCAL_STACK_ATTACH): serve against the running
# `make run` stack, or stop with one line. Before the rest loads, so nothing is printed first.
# The dev stack is never packaged, so it is imported only when asked for.
if os.environ.get("LOCAL_STACK_ATTACH"):
    from devstack import stack_file

    stack_file.attach_or_exit(os.environ)

from chalicelib import logs, workers
from chalicelib.api import (
    admin,
    audit,
    clients,
    imports,
    inbound,
    mailings,
    operations,
    security,
    stats,
    system,
)
from chalicelib.container import services

# JSON log lines for CloudWatch (the local stack and tests configure their own first).
logs.ensure_configured()
app = Chalice(app_name="sms-campaigns")
app.register_blueprint(security.blueprint)
for module in (system, clients, imports, mailings, stats, operations, admin, audit, inbound):
    # JSON bodies above MAX_BODY_BYTES get a 413 (read at request time, from the settings).
    module.api.limit_bodies(lambda: services().settings.max_body_bytes)
    # Creates sent with an Idempotency-Key run once per caller and key (see docs/api.md).
    module.api.keep_idempotency_keys(lambda: services().idempotency)
    # Every write leaves an audit entry (GET /audit).
    module.api.audit_writes(lambda: services().audit)
    app.register_blueprint(module.api.blueprint)
app.register_blueprint(workers.blueprint)
