"""Accounts and sessions: `users.password_hash` and `users.deleted_at`, `auth_sessions` in place
of `api_tokens`, `devices.session_id`, and `external_identities` (users of an OpenID Connect
provider, by issuer and subject).

Every API token becomes a session of its user (the same token keeps working), expiring 30 days
after the upgrade unless used (each use slides it forward). Users registered before have no
password: their session works, and `PUT /users/me/password` sets one. Their devices belong to
that session, so signing it out removes them as it would a device registered under it.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SESSION_TTL's default: what a migrated token is given before its next use slides it.
MIGRATED_SESSION_DAYS = 30
TIMESTAMP = sa.DateTime(timezone=True)

_api_tokens = sa.table(
    "api_tokens",
    sa.column("token_hash", sa.String()),
    sa.column("user_id", sa.Uuid()),
    sa.column("created_at", TIMESTAMP),
)
_sessions = sa.table(
    "auth_sessions",
    sa.column("id", sa.Uuid()),
    sa.column("user_id", sa.Uuid()),
    sa.column("token_hash", sa.String()),
    *(sa.column(name, TIMESTAMP) for name in ("created_at", "last_used_at", "expires_at")),
)


def _stored(moment: datetime, dialect: str) -> datetime:
    """As the models store a time: naive UTC on SQLite, aware elsewhere."""
    return moment.replace(tzinfo=None) if dialect == "sqlite" else moment


def upgrade() -> None:
    op.create_table(
        "auth_sessions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(100), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("last_used_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_auth_sessions_user_id_users"),
        sa.PrimaryKeyConstraint("id", name="pk_auth_sessions"),
        sa.UniqueConstraint("token_hash", name="uq_auth_sessions_token_hash"),
    )
    op.create_index("ix_auth_sessions_user_id", "auth_sessions", ["user_id"])
    # What the expiry sweep looks for.
    op.create_index("ix_auth_sessions_expires_at", "auth_sessions", ["expires_at"])

    connection = op.get_bind()
    dialect = connection.dialect.name
    now = datetime.now(UTC)
    expires_at = _stored(now + timedelta(days=MIGRATED_SESSION_DAYS), dialect)
    rows = connection.execute(sa.select(_api_tokens)).all()
    if rows:
        connection.execute(
            _sessions.insert(),
            [
                {
                    "id": uuid.uuid4(),
                    "user_id": row.user_id,
                    "token_hash": row.token_hash,
                    "created_at": row.created_at,
                    "last_used_at": _stored(now, dialect),
                    "expires_at": expires_at,
                }
                for row in rows
            ],
        )
    op.drop_index("ix_api_tokens_user_id", table_name="api_tokens")
    op.drop_table("api_tokens")
    op.create_table(
        "external_identities",
        sa.Column("issuer", sa.String(255), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_external_identities_user_id_users"
        ),
        sa.PrimaryKeyConstraint("issuer", "subject", name="pk_external_identities"),
    )
    op.create_index("ix_external_identities_user_id", "external_identities", ["user_id"])

    # Not a batch: on SQLite that copies the table, which the tables referring to users forbid.
    op.add_column("users", sa.Column("password_hash", sa.String(255), nullable=True))
    op.add_column("users", sa.Column("deleted_at", TIMESTAMP, nullable=True))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("session_id", sa.Uuid(), nullable=True))
        batch.create_foreign_key(
            "fk_devices_session_id_auth_sessions", "auth_sessions", ["session_id"], ["id"]
        )
        batch.create_index("ix_devices_session_id", ["session_id"])
    # Each user had one token: their devices join the session it became.
    op.execute(
        "UPDATE devices SET session_id = (SELECT s.id FROM auth_sessions s"
        " WHERE s.user_id = devices.user_id ORDER BY s.created_at LIMIT 1)"
    )


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_index("ix_devices_session_id")
        batch.drop_constraint("fk_devices_session_id_auth_sessions", type_="foreignkey")
        batch.drop_column("session_id")
    for column in ("deleted_at", "password_hash"):
        op.execute(f"ALTER TABLE users DROP COLUMN {column}")  # SQLite 3.35+ has it too
    op.create_table(
        "api_tokens",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_api_tokens_user_id_users"),
        sa.PrimaryKeyConstraint("token_hash", name="pk_api_tokens"),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    # Every session's token is an API token again.
    op.execute(
        "INSERT INTO api_tokens (token_hash, user_id, created_at)"
        " SELECT token_hash, user_id, created_at FROM auth_sessions"
    )
    op.drop_index("ix_external_identities_user_id", table_name="external_identities")
    op.drop_table("external_identities")
    op.drop_index("ix_auth_sessions_expires_at", table_name="auth_sessions")
    op.drop_index("ix_auth_sessions_user_id", table_name="auth_sessions")
    op.drop_table("auth_sessions")
