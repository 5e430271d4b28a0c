"""Alembic migrations of notification-router, run at start-up by `herald_shared.database`."""
