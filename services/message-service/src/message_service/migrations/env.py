"""Alembic environment: migrates the connection `herald_shared.database.run_migrations` hands in."""

from alembic import context

from message_service.models import metadata

config = context.config
context.configure(
    connection=config.attributes["connection"],
    target_metadata=metadata,
    version_table=config.attributes["version_table"],
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
