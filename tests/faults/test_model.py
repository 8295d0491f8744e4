"""The fault suite's model and checker can fail: each claim below is a way a cluster could
go wrong, fed by hand, and the checker must say so (and allow what is allowed)."""

from __future__ import annotations

from tests.faults.model import (
    CELL,
    ZERO,
    Model,
    ServingRecord,
    cell_bytes,
    longest_gap,
    records,
    summary,
)

SIZE = 8 * CELL


def volume_of(*writes: int) -> bytes:
    """What a volume of len(writes) cells reads if cell i holds writes[i]."""
    return b"".join(cell_bytes(w, cell) for cell, w in enumerate(writes))


def filled(model: Model, volume: str = "V1") -> list[int]:
    """Creates `volume` and acknowledges one fill write per cell; returns their ids."""
    model.create(volume, SIZE)
    ids = []
    for cell in range(SIZE // CELL):
        record = model.issue(volume, cell, "fill")
        model.acknowledged(record)
        ids.append(record.id)
    return ids


def test_a_cell_says_which_write_it_holds() -> None:
    assert records(cell_bytes(42, 3)) == [(3, 42)] * (CELL // 16)
    assert records(bytes(CELL)) == [(-1, ZERO)] * (CELL // 16)
    assert records(b"\xff" * 16) == [None]


def test_what_the_model_allows_reads_clean() -> None:
    model = Model()
    fill = filled(model)
    assert model.check("V1", volume_of(*fill)) == []


def test_a_new_volume_reads_zeros_and_nothing_else() -> None:
    model = Model()
    model.create("V", SIZE)
    assert model.check("V", bytes(SIZE)) == []
    [violation] = model.check("V", bytes(CELL) + b"\x01" + bytes(SIZE - CELL - 1))
    assert violation.what == "wrong data" and violation.offset == CELL


def test_an_acknowledged_write_that_is_not_there_is_a_lost_acknowledgement() -> None:
    model = Model()
    fill = filled(model)
    write = model.issue("V1", 2, "w1")
    model.acknowledged(write)
    [violation] = model.check("V1", volume_of(*fill))  # cell 2 still holds the fill
    assert violation.what == "lost acknowledged write"
    assert (violation.volume, violation.offset) == ("V1", 2 * CELL)
    assert f"#{fill[2]}" in violation.read and f"#{write.id}" in violation.allowed


def test_a_late_write_that_lands_after_an_acknowledged_one_is_caught() -> None:
    model = Model()
    fill = filled(model)
    late = model.issue("V1", 5, "w1")
    model.unknown(late, "connection lost")  # old or new, for now
    acked = model.issue("V1", 5, "w1")
    model.acknowledged(acked)  # from here on only this one
    cells = list(fill)
    cells[5] = late.id  # ...but the first write landed after it
    [violation] = model.check("V1", volume_of(*cells))
    assert violation.offset == 5 * CELL and f"#{late.id}" in violation.read
    assert violation.allowed.startswith(f"#{acked.id} ")


def test_a_write_with_an_unknown_outcome_may_be_old_or_new_or_torn_between_them() -> None:
    model = Model()
    fill = filled(model)
    maybe = model.issue("V1", 1, "w1")
    model.unknown(maybe, "error reply: EIO")
    old, new = volume_of(*fill), volume_of(fill[0], maybe.id, *fill[2:])
    assert model.check("V1", old) == []
    assert model.check("V1", new) == []
    torn = old[:CELL + 512] + new[CELL + 512:]  # failed half-way through the cell
    assert model.check("V1", torn) == []
    other = model.issue("V1", 3, "w2")  # a write for cell 3, landed in cell 1
    misplaced = old[:CELL] + cell_bytes(other.id, 3) + old[2 * CELL:]
    [violation] = model.check("V1", misplaced)
    assert violation.what == "wrong data" and "its record says cell 3" in violation.read


def test_bytes_of_no_write_are_caught_with_the_first_bad_byte() -> None:
    model = Model()
    fill = filled(model)
    data = bytearray(volume_of(*fill))
    data[4 * CELL + 100] ^= 0xFF
    [violation] = model.check("V1", bytes(data))
    assert violation.offset == 4 * CELL and "first disallowed byte at +100" in violation.read


def test_a_snapshot_keeps_what_its_source_allowed_when_it_was_taken() -> None:
    model = Model()
    fill = filled(model)
    model.copy("S", "V1")
    after = model.issue("V1", 0, "w1")
    model.acknowledged(after)
    assert model.check("S", volume_of(*fill)) == []
    [violation] = model.check("S", volume_of(after.id, *fill[1:]))  # no copy-on-write
    assert (violation.volume, violation.offset) == ("S", 0)
    assert model.check("V1", volume_of(after.id, *fill[1:])) == []


def test_a_write_queued_on_a_deposed_controller_found_in_s1_is_caught() -> None:
    model = Model()
    fill = filled(model)
    model.copy("S1", "V1")  # through the new leader
    queued = model.issue("V1", 6, "queued", never=True)
    model.unknown(queued, "connection lost")  # whatever the client saw, never allowed
    landed = volume_of(*fill[:6], queued.id, *fill[7:])
    for volume in ("S1", "V1"):
        [violation] = model.check(volume, landed)
        assert violation.what == "write that must never land"
        assert violation.offset == 6 * CELL and "deposed controller" in violation.read


def test_an_acknowledged_write_that_must_never_be_is_reported() -> None:
    model = Model()
    filled(model)
    queued = model.issue("V1", 0, "queued", never=True)
    assert model.never_acknowledged() == []
    model.acknowledged(queued)
    [violation] = model.never_acknowledged()
    assert violation.what == "deposed ack" and f"#{queued.id}" in violation.read
    assert model.allowed("V1", 0) != {queued.id}  # and it is not allowed anywhere


def test_an_acknowledgement_sent_after_a_newer_leader_served_is_from_a_deposed_one() -> None:
    model = Model(start=1000.0)
    model.create("V1", SIZE)
    servings = [ServingRecord(1000.5, "127.0.0.1:1", 11, 1),
                ServingRecord(1010.0, "127.0.0.1:2", 22, 2)]

    def write(cell: int, pending_seen: float, late: bool = False) -> None:
        record = model.issue("V1", cell, "w1", at=1001.0 + cell)
        record.controller, record.pid, record.connected = "127.0.0.1:1", 11, 1001.0
        record.pending_seen = pending_seen
        if late:
            model.unknown(record, "given up")
            record.late_ack = pending_seen + 0.1
        else:
            model.acknowledged(record, at=pending_seen + 0.1)

    write(0, pending_seen=1009.0)  # answered before epoch 2 served: fine
    assert model.deposed_acks(servings) == []
    write(1, pending_seen=1010.5)  # still pending when epoch 2 served, then acknowledged
    write(2, pending_seen=1011.0, late=True)  # given up by the client, acknowledged late
    found = model.deposed_acks(servings)
    assert [v.offset for v in found] == [CELL, 2 * CELL]
    assert all("epoch 2" in v.read and "epoch 1" in v.allowed for v in found)


def test_a_run_of_bad_cells_is_one_report() -> None:
    model = Model()
    filled(model)
    [violation] = model.check("V1", bytes(SIZE))
    assert violation.cells == SIZE // CELL and violation.what == "lost acknowledged write"
    assert "and the 7 cells after it" in violation.describe()


def test_a_report_names_volume_offset_what_was_read_and_what_is_allowed() -> None:
    model = Model()
    fill = filled(model)
    [violation] = model.check("V1", volume_of(*fill[:3], ZERO, *fill[4:]))
    text = violation.describe()
    assert "V1 offset 12288 (cell 3)" in text
    assert "reads zeros" in text and f"the model allows #{fill[3]} (fill to V1 cell 3" in text


def test_unavailability_is_the_longest_gap_between_acknowledgements_after_the_fault() -> None:
    acks = [1.0, 2.0, 10.2, 10.3, 13.0]
    assert longest_gap(acks, since=2.5, until=14.0) == 10.2 - 2.5
    assert longest_gap(acks, since=2.5, until=14.0, excluded=[(4.0, 8.0)]) == 10.2 - 2.5 - 4.0
    assert longest_gap([], since=2.0, until=5.0) == 3.0  # nothing after the fault at all
    assert summary([1.0, 3.0, 2.0]) == {"median": 2.0, "max": 3.0}
