"""Alembic environment: migrate on the connection that `run_migrations` hands in."""

from __future__ import annotations

from alembic import context

from notification_router.tables import metadata

config = context.config
context.configure(
    connection=config.attributes["connection"],
    target_metadata=metadata,
    version_table=config.attributes["version_table"],
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
