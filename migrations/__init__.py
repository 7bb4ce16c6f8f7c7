"""convo's Alembic migrations (installed as the ``convo.migrations`` package)."""
