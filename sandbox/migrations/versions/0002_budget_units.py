"""budget units

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 22:23:09.221134
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('budget_accounts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('spent_epsilon_sq', sa.Float(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('spent_rho', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('spent_delta', sa.Float(), nullable=False,
                                      server_default='0'))

    with op.batch_alter_table('budget_charges', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rho', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('delta', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('unit', sa.String(length=10), nullable=False,
                                      server_default='epsilon'))
        batch_op.add_column(sa.Column('amount', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('note', sa.String(length=200), nullable=True))
        batch_op.alter_column('epsilon',
               existing_type=sa.FLOAT(),
               nullable=True)

    # Existing charges were all pure epsilon: carry them over into the new columns.
    op.execute("UPDATE budget_charges SET amount = epsilon")
    op.execute("UPDATE budget_accounts SET spent_epsilon_sq = (SELECT COALESCE(SUM(epsilon * "
               "epsilon), 0) FROM budget_charges c WHERE c.dataset_id = "
               "budget_accounts.dataset_id)")

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rho', sa.Float(), nullable=True))
        batch_op.alter_column('epsilon',
               existing_type=sa.FLOAT(),
               nullable=True)



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('epsilon',
               existing_type=sa.FLOAT(),
               nullable=False)
        batch_op.drop_column('rho')

    with op.batch_alter_table('budget_charges', schema=None) as batch_op:
        batch_op.alter_column('epsilon',
               existing_type=sa.FLOAT(),
               nullable=False)
        batch_op.drop_column('note')
        batch_op.drop_column('amount')
        batch_op.drop_column('unit')
        batch_op.drop_column('delta')
        batch_op.drop_column('rho')

    with op.batch_alter_table('budget_accounts', schema=None) as batch_op:
        batch_op.drop_column('spent_delta')
        batch_op.drop_column('spent_rho')
        batch_op.drop_column('spent_epsilon_sq')

