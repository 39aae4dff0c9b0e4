"""The Chalice application: registers the blueprints; the logic lives in chalicelib."""

from chalice import Chalice

from chalicelib import logs, workers
from chalicelib.api import (
    admin,
    clients,
    imports,
    mailings,
    operations,
    security,
    stats,
    system,
)

# JSON log lines for CloudWatch (the local stack and tests configure their own first).
logs.ensure_configured()
app = Chalice(app_name="sms-campaigns")
app.register_blueprint(security.blueprint)
for module in (system, clients, imports, mailings, stats, operations, admin):
    app.register_blueprint(module.api.blueprint)
app.register_blueprint(workers.blueprint)
