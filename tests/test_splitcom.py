"""SplitCom: skip decisions, cache consistency between the two sides, codecs, entropy coding, error feedback,
adapter coding, spill-to-disk equivalence, controllers end to end, reductions from the ledger, and resume with
caches, error-feedback and DDPG state."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.comm.messages import Message, encode
from fedtune.compression.codecs import CODECS
from fedtune.compression.interfaces import Interface, InterfaceSettings
from fedtune.engine.runner import Runner

D = 16


def _iface(tmp_path, **kw) -> Interface:
    settings = InterfaceSettings(kind="activations", field="hidden", reuse=True, projection_dim=8, **kw)
    return Interface(settings, D, seed=0, spill_dir=tmp_path)


def _batch(seed=0, lengths=(5, 3, 6)):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    x = torch.randn(len(lengths), T, D, generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return x, mask


def test_first_sight_is_sent_unchanged_is_reused_changed_is_sent(tmp_path):
    iface = _iface(tmp_path)
    x, mask = _batch()
    msg, plain = iface.send(0, [10, 11, 12], x, mask, {}, theta=0.999, epoch=0)
    assert msg.tensors["sent"].tolist() == [True, True, True]
    out = iface.receive(0, msg, mask)
    torch.testing.assert_close(out[mask.bool()], x[mask.bool()])
    assert (out[~mask.bool()] == 0).all()

    x2 = x.clone()
    x2[1] = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(9))  # sample 11 changed
    x2[2] += 1e-4  # sample 12 barely moved
    msg2, plain2 = iface.send(0, [10, 11, 12], x2, mask, {}, theta=0.999, epoch=1)
    assert msg2.tensors["sent"].tolist() == [False, True, False]
    out2 = iface.receive(0, msg2, mask)
    torch.testing.assert_close(out2[1, :3], x2[1, :3])  # sent: exact
    torch.testing.assert_close(out2[0, :5], x[0, :5].half().float())  # reused: the cached fp16 copy
    assert len(encode(msg2)) < len(encode(plain2)) / 2
    assert iface.counts.by_epoch[1] == [1, 3]


def test_a_per_token_metric_sees_a_changed_token_beside_a_massive_sink_token(tmp_path):
    """Past block 3 SmolLM2's first token holds most of a short sample's energy: the whole-sample cosine stays
    above theta when a response token changes, the least similar token's cosine does not."""
    x, mask = _batch(lengths=(6, 6))
    x[:, 0] *= 100.0  # the attention sink
    moved = x.clone()
    moved[:, 4] = torch.randn(2, D, generator=torch.Generator().manual_seed(3))  # one token changed
    decisions = {}
    for metric in ("cosine", "token_mean", "token_min"):
        iface = _iface(tmp_path / metric, metric=metric)
        iface.send(0, [1, 2], x, mask, {}, theta=0.99, epoch=0)
        again, _ = iface.send(0, [1, 2], x, mask, {}, theta=0.99, epoch=1)
        assert again.tensors["sent"].tolist() == [False, False], metric  # unchanged: reused by every metric
        changed, _ = iface.send(0, [1, 2], moved, mask, {}, theta=0.99, epoch=2)
        decisions[metric] = changed.tensors["sent"].tolist()
    assert decisions["cosine"] == [False, False]  # the sink holds the whole-sample cosine near 1
    assert decisions["token_min"] == [True, True]
    assert decisions["token_mean"] == [True, True]  # one token in six moves the mean by about a sixth


def test_a_resend_budget_caps_resends_least_similar_first_and_carries_its_credit(tmp_path):
    iface = _iface(tmp_path, codec="int8", resend_budget=0.1)
    x, mask = _batch(lengths=(6, 6, 6))
    first, _ = iface.send(0, [1, 2, 3], x, mask, {}, theta=0.999, epoch=0)
    assert first.tensors["sent"].tolist() == [True, True, True]  # first sends are free
    cost = iface._resend_cost(x[0, :6])  # int8: a quarter of float32, plus scales
    credit = 0.1 * 3 * 6 * D * 4  # the budget's share of the batch, float32
    assert iface.sender._credit(0) == pytest.approx(credit)
    moved = x.clone()
    moved[0] += 0.05 * torch.randn_like(x[0])  # a little changed
    moved[2] = torch.randn_like(x[2])  # changed most
    moved[1] += 0.5 * torch.randn_like(x[1])
    second, _ = iface.send(0, [1, 2, 3], moved, mask, {}, theta=0.999, epoch=1)
    credit = credit * 2
    affordable = int(credit // cost)
    assert 1 <= affordable < 3
    sent = second.tensors["sent"].tolist()
    assert sum(sent) == affordable and sent[2]  # the least similar first
    assert iface.sender._credit(0) == pytest.approx(credit - affordable * cost)
    assert iface.sender._credit(1) == 0.0  # per client


def test_theta_above_one_always_sends_and_a_different_client_has_its_own_cache(tmp_path):
    iface = _iface(tmp_path)
    x, mask = _batch()
    iface.receive(0, iface.send(0, [1, 2, 3], x, mask, {}, theta=0.5, epoch=0)[0], mask)
    again, _ = iface.send(0, [1, 2, 3], x, mask, {}, theta=1.01, epoch=0)
    assert all(again.tensors["sent"].tolist())
    other, _ = iface.send(1, [1, 2, 3], x, mask, {}, theta=0.5, epoch=0)
    assert all(other.tensors["sent"].tolist())


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "int4", "int2"])
def test_client_and_server_agree_on_what_was_last_sent(tmp_path, codec, residual):
    iface = _iface(tmp_path, codec=codec, residual=residual)
    x, mask = _batch()
    keys = [4, 5, 6]
    last_sent = {}
    for step in range(4):
        noisy = x + 0.05 * step * torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
        message = iface.send(0, keys, noisy, mask, {}, theta=0.9999, epoch=step)[0]
        iface.receive(0, message, mask)
        for i, (sid, n) in enumerate(zip(keys, mask.sum(dim=1).tolist())):
            if message.tensors["sent"][i]:
                last_sent[sid] = noisy[i, :n]
    for sid in keys:  # the sender compares with what it last sent (before the codec)
        torch.testing.assert_close(iface.sender.projections.get((0, sid)), iface.sender.projector(last_sent[sid]),
                                   rtol=1e-5, atol=1e-5)
        if residual:
            assert torch.equal(iface.sender.held.get((0, sid)), iface.receiver.store.get((0, sid)))


def _same_caches(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n][k], b[n][k]) for n in a for k in ("keys", "lengths", "data"))


def test_a_sides_caches_travel_by_client_and_a_lost_sessions_go_back(tmp_path, tiny_config):
    """What the Ray backend ships: one side's cache entries of one client (of some samples), loaded into another
    copy of the channels, merged back, or restored after a lost session."""
    from fedtune.compression.channels import SplitChannels

    cfg = tiny_config("paradigm=split", "split.ushape=true", "split.cut=2", "compression.method='splitcom'",
                      "compression.residual=true")
    ch, other = (SplitChannels(cfg, D, True, tmp_path / n) for n in ("a", "b"))
    x, mask = _batch()

    def session(client: int, shift: float) -> None:
        for name in ("activations", "body_output"):  # one each way
            ch[name].receive(client, ch[name].send(client, [1, 2, 3], x + shift, mask, {}, 0.9, 0)[0], mask)

    session(0, 0.0)
    session(1, 0.0)
    client0 = ch.export_caches("client", 0)
    def stores(sends: tuple[str, str], receives: tuple[str, str]) -> set[str]:
        return {f"{n}.{s}" for n in sends for s in ("projections", "held", "credit")} | {f"{n}.received"
                                                                                        for n in receives}

    assert set(client0) == stores(("activations", "tail_gradients"), ("body_output", "gradients"))
    assert set(ch.export_caches("server")) == stores(("body_output", "gradients"), ("activations", "tail_gradients"))
    assert ch.export_caches("client", 0, {2})["activations.held"]["keys"].tolist() == [[0, 2]]
    other.load_caches("client", client0)  # a worker's copy holds one client's
    assert _same_caches(other.export_caches("client"), client0)
    other.update_caches("client", ch.export_caches("client", 1))  # the driver merges a session's entries
    assert _same_caches(other.export_caches("client"), ch.export_caches("client"))

    server0 = ch.export_caches("server", 0)
    session(0, 1.0)  # changes client 0's entries on both sides; then the session is lost
    assert not _same_caches(ch.export_caches("server", 0), server0)
    server1 = ch.export_caches("server", 1)
    ch.load_caches("server", server0, client=0)
    assert _same_caches(ch.export_caches("server", 0), server0)
    assert _same_caches(ch.export_caches("server", 1), server1)


def test_int8_codec_is_close_and_four_times_smaller():
    x = torch.randn(40, 64)
    codec = CODECS.get("int8")()
    wire = codec.encode(x)
    assert (codec.decode(wire) - x).abs().max() <= x.abs().amax(dim=1).max() / 127 * 0.51 + 1e-3
    wire_bytes = sum(t.numel() * t.element_size() for t in wire.values())
    assert wire_bytes < x.numel() * 4 / 3.5


@pytest.mark.parametrize("codec, bits", [("int4", 4), ("int2", 2)])
@pytest.mark.parametrize("width", [64, 100, 3])  # whole groups, a padded last group, a row shorter than a group
def test_low_bit_codecs_are_within_half_a_step_and_pack_their_bits(codec, bits, width):
    x = torch.randn(7, width, generator=torch.Generator().manual_seed(width)) * torch.linspace(0.1, 10, 7)[:, None]
    x[3] = 0.0  # an all-zero row
    c = CODECS.get(codec)()
    wire = c.encode(x)
    back = c.decode(wire)
    assert back.shape == x.shape and not back[3].any()
    groups = -(-width // 64)
    padded = torch.nn.functional.pad(x, (0, groups * 64 - width)).reshape(7, groups, 64)
    step = padded.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)  # each group's scale
    error = torch.nn.functional.pad(back - x, (0, groups * 64 - width)).reshape(7, groups, 64).abs().amax(dim=-1)
    assert (error <= 0.5 * step * 1.001 + 1e-7).all()
    assert wire["q"].dtype == torch.uint8 and wire["q"].numel() == -(-7 * groups * 64 * bits // 8)
    assert torch.equal(c.decode(c.encode(back)), back)  # what the receiver holds re-encodes to itself


@pytest.mark.parametrize("codec, levels", [("topk-int4", 7), ("topk-int2", 1)])
def test_topk_codecs_keep_the_fewest_rows_holding_99_percent_within_half_a_step(codec, levels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 100, generator=g) * 0.01
    x[[3, 17, 29]] *= 1000  # three rows hold nearly all of the squared norm
    c = CODECS.get(codec)()
    wire = c.encode(x)
    back = c.decode(wire)
    assert wire["kept"].nonzero().flatten().tolist() == [3, 17, 29]
    assert not back[~wire["kept"]].any()
    kept = x[wire["kept"]]
    padded = torch.nn.functional.pad(kept, (0, 28)).reshape(3, 2, 64)
    step = padded.abs().amax(dim=-1) / levels
    error = torch.nn.functional.pad(back[wire["kept"]] - kept, (0, 28)).reshape(3, 2, 64).abs().amax(dim=-1)
    assert (error <= 0.5 * step * 1.001).all()
    assert x[~wire["kept"]].pow(2).sum() <= 0.01 * x.pow(2).sum()
    assert c.decode(c.encode(torch.zeros(0, 100))).shape == (0, 100)


def test_entropy_coding_is_lossless_and_the_message_is_its_zstd_frame(tmp_path):
    import zstandard
    from safetensors.torch import save

    from fedtune.compression import entropy

    x, mask = _batch()
    plain_iface = Interface(InterfaceSettings(kind="gradients", field="grad", codec="int4"), D, 0, tmp_path / "a")
    packed_iface = Interface(InterfaceSettings(kind="gradients", field="grad", codec="int4", entropy="zstd"), D, 0,
                             tmp_path / "b")
    extra = {"labels": torch.full((3, 6), -100, dtype=torch.int32)}
    plain, _ = plain_iface.send(0, [1, 2, 3], x, mask, extra, 1.0, 0)
    packed, baseline = packed_iface.send(0, [1, 2, 3], x, mask, extra, 1.0, 0)
    assert set(packed.tensors) == {"zstd"}
    frame = packed.tensors["zstd"].numpy().tobytes()
    assert frame == zstandard.ZstdCompressor(level=entropy.LEVEL).compress(save(plain.tensors))  # the real frame
    opened = packed_iface.open(packed).tensors
    assert opened.keys() == plain.tensors.keys() and all(torch.equal(opened[k], plain.tensors[k]) for k in opened)
    assert torch.equal(packed_iface.receive(0, packed, mask), plain_iface.receive(0, plain, mask))
    assert len(encode(packed)) < len(encode(plain)) < len(encode(baseline))


@pytest.mark.parametrize("feedback", [False, True])
def test_error_feedback_delivers_what_the_codec_dropped(tmp_path, feedback):
    """The same sample's gradient sent 16 times through int2: with error feedback the receiver's running sum is the
    true sum within one send's error (what is still held back); without, the codec's bias adds up every send."""
    x, mask = _batch(lengths=(6,))
    iface = Interface(InterfaceSettings(kind="gradients", field="grad", codec="int2", error_feedback=feedback), D, 0,
                      tmp_path)
    received = torch.zeros_like(x)
    for step in range(1, 17):
        received += iface.receive(0, iface.send(0, [7], x, mask, {}, 1.0, step)[0], mask)
        drift = (received - step * x).norm() / x.norm()
    one_send = (iface.receive(0, Interface(InterfaceSettings(kind="gradients", field="grad", codec="int2"), D, 0,
                tmp_path / "x").send(0, [7], x, mask, {}, 1.0, 0)[0], mask) - x).norm() / x.norm()
    if feedback:
        assert drift <= 1.01 * one_send  # bounded: what the last send held back
        torch.testing.assert_close(iface.feedback.store.get((0, 7)), (step * x - received)[0])  # what is held back
    else:
        assert drift > 10 * one_send  # 16 biased sends: the error grew with them


def test_adapter_upload_is_its_change_from_the_download_and_the_ledger_knows_the_plain_size():
    from fedtune.comm.ledger import Ledger
    from fedtune.comm.transport import Transport
    from fedtune.compression.adapters import AdapterCoder

    g = torch.Generator().manual_seed(0)
    start = {"a.lora_A": torch.randn(8, 96, generator=g), "a.lora_B": torch.zeros(40, 8)}
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    keys = list(start)
    coder = AdapterCoder("int4", "zstd")
    up = coder.encode("client_adapter", trained, keys, {"num_samples": 3}, start=start)
    back = coder.decode(up, start, keys, start)
    largest_change = max((trained[k] - start[k]).abs().max() for k in keys)
    for k in keys:  # within half an int4 step of the change (a group's step is at most the largest change / 7)
        assert (back[k] - trained[k]).abs().max() <= 0.5 * largest_change / 7 * 1.001
        assert back[k].shape == start[k].shape
    ledger = Ledger()
    Transport(ledger).upload(up, round=1, client=0)
    plain_message = Message("client_adapter", {k: trained[k] for k in keys}, {"num_samples": 3})
    assert ledger.baseline_bytes() == len(encode(plain_message))
    assert ledger.bytes() < ledger.baseline_bytes() / 4
    plain = AdapterCoder("none", "zstd")
    as_is = plain.decode(plain.encode("client_adapter", trained, keys), start, keys)
    assert all(torch.equal(as_is[k], trained[k]) for k in keys)


FAST = ("paradigm=split", "split.cut=2", "federation.rounds=3", "train.local_steps=4", "eval.max_new_tokens=4",
        "data.max_train_samples=96", "partition.min_samples=4")


def _run(tmp_path, tiny_config, name, *overrides):
    cfg = tiny_config(*FAST, *overrides)
    summary = Runner(cfg, tmp_path / name).run()
    return summary


def test_reuse_cuts_uplink_and_reductions_come_from_the_ledger(tmp_path, tiny_config):
    vanilla = _run(tmp_path, tiny_config, "vanilla")
    reuse = _run(tmp_path, tiny_config, "reuse", "compression.method='splitcom'", "compression.theta=0.5")
    assert reuse["comm"]["uplink_bytes"] < vanilla["comm"]["uplink_bytes"] / 2
    # the run's own uncompressed equivalent is what vanilla split really sent (up to the digits of the
    # train loss in the adapter messages' headers: the two runs train differently)
    assert abs(reuse["comm"]["uncompressed_uplink_bytes"] - vanilla["comm"]["uplink_bytes"]) < 100
    expected = 1 - reuse["comm"]["uplink_bytes"] / reuse["comm"]["uncompressed_uplink_bytes"]
    assert reuse["comm"]["uplink_reduction"] == pytest.approx(expected)
    ratios = reuse["compression"]["activations"]["upload_ratio_per_epoch"]
    assert ratios["0"] == 1.0 and min(ratios.values()) < 0.2
    assert reuse["final"]["eval_loss"] < reuse["initial"]["eval_loss"]


def test_spill_to_disk_gives_the_same_run(tmp_path, tiny_config):
    args = ("compression.method='splitcom'", "compression.theta=0.9", "compression.codec='int8'")
    a = _run(tmp_path, tiny_config, "memory", *args)
    b = _run(tmp_path, tiny_config, "spill", *args, "compression.cache_budget_mb=0.05")
    assert a["comm"] == b["comm"] and a["final"] == b["final"]
    wa = load_file(tmp_path / "memory" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "spill" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("controller", ["bangbang", "ddpg"])
def test_controllers_run_and_record_their_thresholds(tmp_path, tiny_config, controller):
    summary = _run(tmp_path, tiny_config, controller, "compression.method='splitcom'",
                   f"compression.controller='{controller}'", "compression.theta_min=0.5", "compression.theta_max=0.9999")
    trajectory = summary["compression"]["activations"]["threshold_trajectory"]
    assert len(trajectory) == 3 * 3  # rounds x clients
    lines = [json.loads(x) for x in (tmp_path / controller / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["thresholds"]["activations"]) == 3 for r in lines[1:])
    if controller == "bangbang":
        assert {t[2] for t in trajectory} <= {0.99, 0.9999}


def test_ushape_compresses_all_four_interfaces(tmp_path, tiny_config):
    summary = _run(tmp_path, tiny_config, "u", "split.ushape=true", "split.cut=1", "compression.method='splitcom'",
                   "compression.theta=0.5", "compression.codec='fp16'")
    for name in ("activations", "body_output", "tail_gradients", "gradients"):
        part = summary["compression"][name]
        assert part["reuse"] and part["bytes"] < part["uncompressed_bytes"] / 2, name
    assert summary["comm"]["exchange_total_reduction"] > 0.5


def test_int4_sends_an_eighth_on_every_interface_and_the_model_still_learns(tmp_path, tiny_config):
    summary = _run(tmp_path, tiny_config, "int4", "split.ushape=true", "split.cut=1", "compression.method='splitcom'",
                   "compression.theta=1.0", "compression.codec='int4'")  # theta 1: (nearly) every sample sent, coded
    for name in ("activations", "body_output", "tail_gradients", "gradients"):
        part = summary["compression"][name]
        assert part["bytes"] < part["uncompressed_bytes"] / 6, name  # 0.53 bytes a value against 4
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]


#: configs/splitcom-ushape.toml's stages (with residuals on): reuse with int4 residuals, the gradients coded with
#: error feedback, one zstd frame per message, the LoRA upload as its int4 change, the download int8.
STACK = ("compression.method='splitcom'", "compression.codec='int4'", "compression.residual=true",
         "compression.entropy='zstd'", "compression.adapter_codec='int4'", "compression.adapter_download_codec='int8'",
         "compression.per_interface={tail_gradients={reuse=false,codec='topk-int2',error_feedback=true},"
         "gradients={reuse=false,codec='int2',error_feedback=true}}")


def test_the_shipped_stack_codes_every_message_and_the_model_still_learns(tmp_path, tiny_config):
    summary = _run(tmp_path, tiny_config, "stack", "split.ushape=true", "split.cut=1", *STACK)
    parts = summary["compression"]
    for name in ("activations", "body_output", "tail_gradients", "gradients"):
        assert parts[name]["bytes"] < parts[name]["uncompressed_bytes"] / 8, name
    assert not parts["gradients"]["reuse"] and not parts["tail_gradients"]["reuse"]
    assert parts["activations"]["reuse"] and parts["body_output"]["reuse"]
    plain = _run(tmp_path, tiny_config, "plain-adapters", "split.ushape=true", "split.cut=1",
                 "compression.method='splitcom'")
    assert summary["comm"]["adapter_bytes"] < 0.5 * plain["comm"]["adapter_bytes"]
    assert summary["comm"]["total_reduction"] > 0.9
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]


def test_tiny_splitcom_over_8_one_epoch_rounds_shows_its_reduction(tmp_path, tiny_config):
    """The tiny model, 8 rounds of one epoch each, with configs/splitcom.toml's stages (theta 0.95: the random tiny
    model's activations move far more between epochs than SmolLM2's, whose 0.999 reuses almost everything)."""
    cfg = tiny_config("paradigm=split", "split.cut=2", "federation.rounds=8", "train.local_epochs=1",
                      "data.max_train_samples=48", "partition.method=iid", "eval.max_new_tokens=4",
                      "compression.method='splitcom'", "compression.theta=0.95", "compression.codec='int4'",
                      "compression.residual=true", "compression.entropy='zstd'", "compression.adapter_codec='int4'")
    summary = Runner(cfg, tmp_path / "eight").run()
    ratios = summary["compression"]["activations"]["upload_ratio_per_epoch"]
    assert len(ratios) == 8 and ratios["0"] == 1.0 and max(list(ratios.values())[1:]) < 0.6
    records = [json.loads(x) for x in (tmp_path / "eight" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if "upload_ratio_round" in r]
    # one epoch per round: round r's ratio is epoch r-1's; the cumulative one is the running ratio so far
    assert [r["upload_ratio_round"]["activations"] for r in rounds] == pytest.approx(list(ratios.values()))
    assert rounds[-1]["upload_ratio_cumulative"]["activations"] == pytest.approx(
        summary["compression"]["activations"]["upload_ratio"])
    assert summary["comm"]["uplink_reduction"] > 0.93  # coding alone (theta 1) gives 0.90
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]


@pytest.mark.parametrize("stack", [False, True], ids=["ddpg-int8", "ushape-stack"])
def test_resume_with_caches_and_ddpg_state(tmp_path, tiny_config, monkeypatch, stack):
    """Crash in round 3 (after round 2's checkpoint), resume: same bytes, losses, thresholds, ratios (and, with the
    shipped U-shape stack, the error-feedback state of both sides)."""
    from fedtune.paradigms.split import SplitFed

    args = ("compression.method='splitcom'", "compression.controller='ddpg'", "compression.residual=true",
            "compression.codec='int8'", "compression.theta_min=0.5")
    if stack:
        args = (*STACK, "split.ushape=true", "split.cut=1", "compression.controller='ddpg'",
                "compression.theta_min=0.5", "compression.resend_budget=0.05")
    full = _run(tmp_path, tiny_config, "full", *args)
    real = SplitFed.run_round

    def crash_in_round_3(self, round):
        if round == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(self, round)

    monkeypatch.setattr(SplitFed, "run_round", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_config, "crashed", *args)
    monkeypatch.setattr(SplitFed, "run_round", real)
    resumed = Runner(tiny_config(*FAST, *args), tmp_path / "crashed").run(resume=True)
    assert resumed["comm"] == full["comm"] and resumed["final"] == full["final"]
    assert resumed["compression"] == full["compression"]


def test_compression_needs_split(tiny_config):
    from fedtune.core.errors import ConfigError

    with pytest.raises(ConfigError, match="compression applies to the split interfaces"):
        tiny_config("compression.method='splitcom'")
    with pytest.raises(ConfigError, match="exist only in a U-shape"):
        tiny_config("paradigm=split", "compression.method='splitcom'", "compression.interfaces=['body_output']")
