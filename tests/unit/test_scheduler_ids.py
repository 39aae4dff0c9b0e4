"""Message ids are reserved in growing blocks and never handed out twice."""

from __future__ import annotations

from chalicelib.services.scheduler import IdBlock


class Sequence:
    """The sequence item: hands out the next `count` ids and remembers each reservation."""

    def __init__(self) -> None:
        self.value = 0
        self.reservations: list[int] = []

    def reserve(self, count: int) -> int:
        self.reservations.append(count)
        self.value += count
        return self.value - count + 1


def test_pages_get_consecutive_ids_from_blocks_that_double():
    """Given pages of 10, when seven pages take ids, then they get consecutive ids from
    reservations that double (10, 20, 40)."""
    sequence = Sequence()
    block = IdBlock(sequence.reserve, page_size=10)

    firsts = [block.take(10) for _ in range(7)]

    assert firsts == [1, 11, 21, 31, 41, 51, 61]
    assert sequence.reservations == [10, 20, 40]


def test_blocks_stop_growing_at_sixteen_pages():
    """Given a hundred pages of 10, when they take ids, then no reservation is larger than sixteen
    pages."""
    sequence = Sequence()
    block = IdBlock(sequence.reserve, page_size=10)

    for _ in range(100):
        block.take(10)

    assert max(sequence.reservations) == 16 * 10
    assert sum(sequence.reservations) >= 1000


def test_a_page_larger_than_what_is_left_gets_a_fresh_block_and_no_id_twice():
    """Given pages of several sizes, one larger than the block's rest, when they take ids, then no
    id is given twice."""
    sequence = Sequence()
    block = IdBlock(sequence.reserve, page_size=10)
    taken = []
    for count in (3, 10, 25, 1):
        first = block.take(count)
        taken.extend(range(first, first + count))

    assert len(taken) == len(set(taken)) == 39


def test_a_later_worker_never_reuses_what_an_earlier_one_left_unused():
    """Given a worker that stopped with part of its block unused, when a later worker takes ids,
    then it starts after the whole block."""
    sequence = Sequence()
    first_worker = IdBlock(sequence.reserve, page_size=10)
    first_worker.take(10)
    first_worker.take(5)  # a block of 20 is reserved; 5 of it are left when this worker stops

    later = IdBlock(sequence.reserve, page_size=10).take(10)

    assert later == 31
