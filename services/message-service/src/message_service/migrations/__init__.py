"""Alembic migrations of message-service, run at start-up by `herald_shared.database`."""
