"""The transport seam and the ledger: bytes recorded are the real serialized sizes."""

from __future__ import annotations

import torch

from fedtune.comm.ledger import DOWN, UP, Ledger
from fedtune.comm.messages import Message, decode, encode
from fedtune.comm.transport import Transport


def test_encode_decode_round_trip_keeps_tensors_and_meta():
    msg = Message("client_update", {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int32)},
                  {"num_samples": 12, "train_loss": 1.5})
    back = decode(encode(msg))
    assert back.kind == "client_update" and back.meta == msg.meta
    assert torch.equal(back.tensors["a"], msg.tensors["a"]) and back.tensors["b"].dtype == torch.int32


def test_ledger_records_exact_serialized_size_per_client_round_direction():
    ledger = Ledger()
    transport = Transport(ledger)
    sizes = {}
    for rnd in (1, 2):
        for client in (0, 3):
            down = Message("global_adapter", {"w": torch.randn(4, 8 + client)})
            up = Message("client_update", {"w": torch.randn(4, 8 + client)}, {"num_samples": client + 1})
            transport.download(down, round=rnd, client=client)
            transport.upload(up, round=rnd, client=client)
            sizes[(rnd, client, DOWN)] = len(encode(down))
            sizes[(rnd, client, UP)] = len(encode(up))
    for (rnd, client, direction), n in sizes.items():
        assert ledger.bytes(round=rnd, client=client, direction=direction) == n
    assert ledger.bytes() == sum(sizes.values())
    assert ledger.bytes(direction=UP, client=3) == sizes[(1, 3, UP)] + sizes[(2, 3, UP)]
    assert ledger.messages(direction=DOWN) == 4
    assert ledger.bytes(kind="global_adapter") == sum(v for (r, c, d), v in sizes.items() if d == DOWN)


def test_payload_bytes_dominate_and_scale_with_tensor_size():
    small = len(encode(Message("x", {"w": torch.zeros(10)})))
    large = len(encode(Message("x", {"w": torch.zeros(10_010)})))
    # 10,000 more float32 values cost 40,000 bytes, plus a few header digits and alignment padding
    assert 40_000 <= large - small <= 40_016


def test_ledger_state_round_trip_and_drop_after():
    ledger = Ledger()
    for rnd in (1, 2, 3):
        ledger.record(rnd, 0, UP, "u", 100 * rnd)
    other = Ledger()
    other.load_state_dict(ledger.state_dict())
    assert other.bytes() == 600
    other.drop_after(2)
    assert other.bytes() == 300


def test_ledger_counts_retransmissions_within_the_bytes_and_keeps_them_in_its_state():
    ledger = Ledger()
    transport = Transport(ledger)
    down = Message("global_adapter", {"w": torch.randn(4, 8)})
    size = len(encode(down))
    transport.send(down, round=1, client=0, direction=DOWN)  # the first try (its turn was lost)
    transport.send(down, round=1, client=0, direction=DOWN, retransmit=True)  # the retry sends it again
    transport.send(down, round=1, client=1, direction=DOWN)
    ledger.record(2, 0, UP, "client_update", 50)
    assert ledger.bytes(round=1, direction=DOWN) == 3 * size  # the repeat crossed: it counts in the totals
    assert ledger.retransmitted_bytes() == ledger.retransmitted_bytes(round=1, client=0, direction=DOWN) == size
    assert ledger.retransmitted_messages() == 1 and ledger.retransmitted_bytes(client=1) == 0
    assert ledger.retransmitted_bytes(round=2) == 0

    rows = ledger.state_dict()
    assert [len(row) for row in rows] == [9, 7, 7]  # only a row with repeats carries their two fields
    other = Ledger()
    other.load_state_dict(rows)
    assert other.state_dict() == rows
    assert other.retransmitted_bytes() == size and other.retransmitted_messages(round=1, client=0) == 1
    assert other.bytes() == ledger.bytes() and other.messages() == 4
    other.drop_after(0)
    assert other.retransmitted_bytes() == 0


def test_ledger_loads_rows_of_checkpoints_written_before_retransmissions():
    ledger = Ledger()
    ledger.load_state_dict([[1, 0, DOWN, "global_adapter", 2, 300, 400], [1, 0, UP, "client_update", 1, 100, 100]])
    assert ledger.bytes() == 400 and ledger.baseline_bytes() == 500 and ledger.messages() == 3
    assert ledger.retransmitted_bytes() == 0 and ledger.retransmitted_messages() == 0
    ledger.record(2, 0, DOWN, "global_adapter", 150, retransmit=True)
    assert ledger.retransmitted_bytes(round=2) == 150 and ledger.bytes(round=2) == 150
