"""The embedded emulator keeps DynamoDB's all-or-nothing transactions after our patch."""

from __future__ import annotations

import pytest
from pynamodb.connection import Connection
from pynamodb.exceptions import TransactWriteError
from pynamodb.transactions import TransactWrite


def test_a_cancelled_transaction_changes_nothing(services):
    Sequence = services.models.Sequence
    Sequence("a", value=1).save()
    Sequence("b", value=1).save()
    connection = Connection(region=services.settings.aws_region)

    def doomed_transaction() -> None:
        with TransactWrite(connection=connection) as tx:
            tx.update(Sequence("a"), actions=[Sequence.value.add(5)])
            tx.save(Sequence("new", value=9))
            tx.delete(Sequence("b"))
            missing = Sequence("c")
            tx.update(missing, actions=[Sequence.value.add(1)], condition=Sequence.name.exists())

    with pytest.raises(TransactWriteError):
        doomed_transaction()

    assert Sequence.get("a").value == 1
    assert Sequence.get("b").value == 1
    assert Sequence.count("new") == 0
    assert Sequence.count("c") == 0


def test_a_committed_transaction_changes_everything(services):
    Sequence = services.models.Sequence
    Sequence("a", value=1).save()
    with TransactWrite(connection=Connection(region=services.settings.aws_region)) as tx:
        tx.update(Sequence("a"), actions=[Sequence.value.add(5)])
        tx.save(Sequence("new", value=9))
    assert Sequence.get("a").value == 6
    assert Sequence.get("new").value == 9
