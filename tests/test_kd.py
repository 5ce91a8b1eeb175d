"""KD-FedLLM: sparse top-k aggregation (mean, confidence, masking), the distillation loss, tokenizer checks,
and end-to-end runs (falling client eval loss, bytes = serialized logit messages, top-k vs full vocab, resume)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedtune.comm.messages import encode
from fedtune.comm.transport import Transport
from fedtune.core.errors import ConfigError
from fedtune.engine.runner import Runner
from fedtune.kd.aggregation import aggregate_logits
from fedtune.kd.distill import check_tokenizers, distill_loss

FAST = ("paradigm=kd", "federation.rounds=2", "train.local_steps=3", "kd.public_samples=16", "kd.distill_steps=1")
V = 6


def _sparse(values, indices, T):
    """Hand-written dense form of softmax(values / T) over ``indices``."""
    dense = [0.0] * V
    exps = [math.exp(v / T) for v in values]
    for i, e in zip(indices, exps):
        dense[i] += e / sum(exps)
    return dense


def _dense(soft, row):
    out = torch.zeros(V)
    out[soft.indices[row].long()] = soft.probs[row]
    return out


def _uploads():
    a_vals, a_idx = [[2.0, 1.0], [0.5, 0.0]], [[0, 1], [3, 4]]
    b_vals, b_idx = [[3.0, 0.0], [1.0, 0.5]], [[1, 2], [3, 5]]
    return [(torch.tensor(a_vals), torch.tensor(a_idx, dtype=torch.int32)),
            (torch.tensor(b_vals), torch.tensor(b_idx, dtype=torch.int32))]


def test_topk_mean_aggregation_matches_hand_computed_sparse_mean():
    T = 2.0
    uploads = _uploads()
    soft = aggregate_logits(uploads, temperature=T, topk=V, vocab_size=V, method="mean")
    for row in range(2):
        expected = [(x + y) / 2 for x, y in zip(*(_sparse(v[row].tolist(), i[row].tolist(), T) for v, i in uploads))]
        assert torch.allclose(_dense(soft, row), torch.tensor(expected), atol=1e-6)
    assert soft.mask.all()
    # top-k of the aggregate, renormalised
    top2 = aggregate_logits(uploads, temperature=T, topk=2, vocab_size=V)
    full = _dense(soft, 0)
    vals, idx = full.topk(2)
    assert set(top2.indices[0].tolist()) == set(idx.tolist())
    assert torch.allclose(top2.probs[0].sum(), torch.tensor(1.0))
    assert torch.allclose(top2.probs[0].sort().values, (vals / vals.sum()).sort().values)


def test_confidence_weighting():
    T = 1.0
    uploads = _uploads()
    soft = aggregate_logits(uploads, temperature=T, topk=V, vocab_size=V, method="confidence")
    for row in range(2):
        dists = [torch.tensor(_sparse(v[row].tolist(), i[row].tolist(), T)) for v, i in uploads]
        w = [d.max() for d in dists]
        expected = (w[0] * dists[0] + w[1] * dists[1]) / (w[0] + w[1])
        assert torch.allclose(_dense(soft, row), expected, atol=1e-6)
    mean = aggregate_logits(uploads, temperature=T, topk=V, vocab_size=V, method="mean")
    assert not torch.allclose(_dense(soft, 0), _dense(mean, 0))


def test_non_finite_positions_are_dropped_and_empty_positions_masked():
    T = 2.0
    good = _uploads()
    bad_vals = torch.tensor([[float("nan"), 1.0], [5.0, 4.0]])
    bad = (bad_vals, torch.tensor([[0, 1], [0, 1]], dtype=torch.int32))
    both = aggregate_logits([good[0], bad], temperature=T, topk=V, vocab_size=V)
    alone = aggregate_logits([good[0]], temperature=T, topk=V, vocab_size=V)
    assert torch.allclose(_dense(both, 0), _dense(alone, 0))  # NaN client ignored at position 0
    assert not torch.allclose(_dense(both, 1), _dense(alone, 1))  # but counted where it is finite
    nan_only = (torch.tensor([[float("inf"), 0.0], [1.0, 0.0]]), torch.tensor([[0, 1], [0, 1]], dtype=torch.int32))
    soft = aggregate_logits([nan_only], temperature=T, topk=2, vocab_size=V)
    assert soft.mask.tolist() == [False, True]
    assert torch.isfinite(soft.probs).all()
    # full-vocabulary uploads (topk = 0) aggregate densely
    dense = aggregate_logits([(torch.randn(3, V), None), (torch.randn(3, V), None)], temperature=T, topk=0, vocab_size=V)
    assert dense.indices is None and dense.probs.shape == (3, V)
    assert torch.allclose(dense.probs.sum(-1), torch.ones(3))


def test_distill_loss_matches_dense_reference():
    torch.manual_seed(0)
    N, T, k = 5, 2.0, 3
    student = torch.randn(N, V, requires_grad=True)
    teacher = torch.softmax(torch.randn(N, V), -1)
    probs, idx = teacher.topk(k, -1)
    probs = probs / probs.sum(-1, keepdim=True)
    mask = torch.tensor([True, True, False, True, True])
    loss = distill_loss(student, idx.to(torch.int32), probs, mask, T)
    # top-k: the student renormalised over the same k indices, i.e. a dense KL between the two restrictions
    on_support = F.log_softmax((student / T).gather(1, idx), -1)
    ref = (torch.xlogy(probs, probs) - probs * on_support).sum(-1)[mask].mean() * T**2
    assert torch.allclose(loss, ref, atol=1e-6)
    log_q = F.log_softmax(student / T, -1)
    # full vocabulary: the usual KL
    full = distill_loss(student, None, teacher, torch.ones(N, dtype=torch.bool), T)
    kl = F.kl_div(log_q, teacher, reduction="batchmean") * T**2
    assert torch.allclose(full, kl, atol=1e-6)
    loss.backward()
    assert student.grad[2].abs().sum() == 0  # masked position adds nothing
    empty = distill_loss(student, idx, probs, torch.zeros(N, dtype=torch.bool), T)
    assert float(empty.detach()) == 0.0


def test_topk_distillation_does_not_push_a_matching_student_to_sharpen():
    """A student whose logits equal the teacher's already matches the teacher's top-k soft labels: zero loss and
    zero gradient, however much mass lies outside the k tokens."""
    torch.manual_seed(1)
    T, k = 2.0, 4
    teacher_logits = torch.randn(6, V)
    values, idx = teacher_logits.topk(k, -1)
    soft = torch.softmax(values / T, -1)  # what a single client's upload aggregates to
    student = teacher_logits.clone().requires_grad_(True)
    loss = distill_loss(student, idx, soft, torch.ones(6, dtype=torch.bool), T)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and student.grad.abs().max() < 1e-6


def test_tokenizer_mismatch_is_a_config_error(tmp_path):
    from fedtune.models.tokenizer import tiny_tokenizer

    a, b = tiny_tokenizer(400, tmp_path), tiny_tokenizer(512, tmp_path)
    check_tokenizers([a, tiny_tokenizer(400, tmp_path)])
    with pytest.raises(ConfigError, match="share one tokenizer"):
        check_tokenizers([a, b])


@pytest.fixture
def upload_tap(monkeypatch):
    sent = []
    real = Transport.upload

    def upload(self, message, *, round, client, **kwargs):
        sent.append((message.kind, len(encode(message))))
        return real(self, message, round=round, client=client, **kwargs)

    monkeypatch.setattr(Transport, "upload", upload)
    return sent


def test_kd_end_to_end(tmp_path, tiny_config, upload_tap):
    import json

    cfg = tiny_config(*FAST, "federation.rounds=3")
    summary = Runner(cfg, tmp_path / "kd").run()
    kd = summary["kd"]
    assert kd["mean_client_eval_loss"] < summary["initial"]["eval_loss"] - 0.02
    assert {k for k, _ in upload_tap} == {"public_logits"}
    assert summary["comm"]["uplink_bytes"] == sum(n for _, n in upload_tap)
    assert len(upload_tap) == 3 * cfg.federation.num_clients
    # soft labels go down once per client per round from round 2 on
    lines = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["downlink_bytes"] == 0 and lines[2]["downlink_bytes"] > 0 and lines[2]["distill_loss"] > 0
    assert set(lines[3]["client_eval_loss"]) == {"0", "1", "2"}
    assert summary["compute"]["client_flops"] > 0


def test_public_set_is_removed_from_partitions(tiny_config, tmp_path):
    """The context leaves the public set out of every partition, so partition.json and planning never count it."""
    from fedtune.core.progress import RunProgress
    from fedtune.engine.context import build_context
    from fedtune.paradigms.kd import KDFed

    cfg = tiny_config(*FAST)
    reference = build_context(tiny_config(*FAST, "paradigm=fedllm"), RunProgress(False), tmp_path / "fedllm")
    ctx = build_context(cfg, RunProgress(False), tmp_path / "kd")
    kd = KDFed(ctx)
    assert len(kd.public_ids) == 16 and ctx.partition_info["reserved_rows"] == 16
    assert [sorted(set(p) - set(kd.public_ids)) for p in reference.partitions] == ctx.partitions
    assert sum(c["num_samples"] for c in ctx.partition_info["clients"]) == len(ctx.train_samples) - 16
    n = len(ctx.train_samples)
    ctx = build_context(tiny_config(*FAST, f"kd.public_samples={n - 1}"), RunProgress(False), tmp_path / "big")
    with pytest.raises(ConfigError, match="no private"):  # one private sample left for three clients
        KDFed(ctx)


def test_full_vocabulary_sends_more_than_topk(tmp_path, tiny_config):
    small = Runner(tiny_config(*FAST, "kd.topk=4"), tmp_path / "k4").run()
    full = Runner(tiny_config(*FAST, "kd.topk=0"), tmp_path / "k0").run()
    assert full["comm"]["uplink_bytes"] > 10 * small["comm"]["uplink_bytes"]
    assert full["comm"]["downlink_bytes"] > small["comm"]["downlink_bytes"]


def test_unknown_aggregation_is_rejected(tiny_config):
    with pytest.raises(ConfigError, match="kd.aggregation"):
        tiny_config("paradigm=kd", "kd.aggregation='median'")


def test_resume_gives_identical_results(tmp_path, tiny_config, monkeypatch):
    from fedtune.paradigms.kd import KDFed

    args = (*FAST, "federation.rounds=3", "kd.server_model=true", "kd.aggregation='confidence'")
    full = Runner(tiny_config(*args), tmp_path / "full").run()
    real = KDFed.run_round

    def crash_in_round_3(self, round):
        if round == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(self, round)

    monkeypatch.setattr(KDFed, "run_round", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        Runner(tiny_config(*args), tmp_path / "crashed").run()
    monkeypatch.setattr(KDFed, "run_round", real)
    resumed = Runner(tiny_config(*args), tmp_path / "crashed").run(resume=True)
    assert resumed["comm"] == full["comm"] and resumed["final"] == full["final"]
    assert resumed["kd"] == full["kd"] and resumed["kd"]["evaluated_model"] == "server"
    assert resumed["compute"] == full["compute"]


SMALL = ("kd.models.small.source='tiny'", "kd.models.small.tiny.arch='llama'", "kd.models.small.tiny.vocab_size=1024",
         "kd.models.small.tiny.hidden_size=32", "kd.models.small.tiny.num_layers=2",
         "kd.models.small.tiny.num_heads=2", "kd.models.small.tiny.intermediate_size=64")


def test_clients_can_run_a_smaller_model_with_the_same_tokenizer(tmp_path, tiny_config):
    cfg = tiny_config(*FAST, *SMALL, "kd.client_models=['main','small','small']")
    summary = Runner(cfg, tmp_path / "hetero").run()
    assert summary["kd"]["client_models"] == ["main", "small", "small"]
    assert summary["kd"]["evaluated_model"] == "client 0"
    flops = {c["id"]: c["flops"] / max(c["rounds_trained"], 1) for c in summary["clients"]}
    samples = {c["id"]: c["num_samples"] for c in summary["clients"]}
    # per trained sample the small model costs well under half of the main one
    assert flops[1] / samples[1] < 0.5 * flops[0] / samples[0]
    assert all(math.isfinite(c["eval_loss"]) for c in summary["clients"])
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]


def test_a_client_model_with_another_tokenizer_is_refused(tmp_path, tiny_config):
    other = [s.replace("vocab_size=1024", "vocab_size=512") for s in SMALL]
    cfg = tiny_config(*FAST, *other, "kd.client_models=['main','small','main']")
    with pytest.raises(ConfigError, match="kd.models.small: .*share one tokenizer"):
        Runner(cfg, tmp_path / "bad").run()


def test_client_model_names_are_checked(tiny_config):
    with pytest.raises(ConfigError, match=r"kd.client_models: unknown model\(s\) \['big'\]; valid: main"):
        tiny_config(*FAST, "kd.client_models=['big']")
    with pytest.raises(ConfigError, match="applies to paradigm 'kd'"):
        tiny_config("kd.client_models=['main']")
