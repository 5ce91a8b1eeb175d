"""Client-level differential privacy of FedLLM: clipping, noise, the accountant, the budget stop and exact resume."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import dp_accounting
import pytest
import torch
from conftest import crash_and_resume
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from safetensors.torch import load_file

from fedtune.core.errors import ConfigError
from fedtune.engine.runner import Runner
from fedtune.privacy.accountant import REPLACE_ONE, ClientAccountant
from fedtune.privacy.client_dp import ClientDP, clip_upload, update_norm

FAST = ("federation.rounds=3", "train.local_steps=3", "eval.max_new_tokens=4", "data.max_train_samples=96",
        "partition.min_samples=4", "eval.metric='none'")
EQUAL = ("partition.method='iid'",)  # 32 samples each: FedAvg's weights are the unweighted mean's


def _run(tmp_path, tiny_config, name, *overrides):
    return Runner(tiny_config(*FAST, *overrides), tmp_path / name).run()


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["central", "local"])
def test_no_noise_and_no_clip_is_the_non_private_run_bit_for_bit(tmp_path, tiny_config, mode):
    plain = _run(tmp_path, tiny_config, "plain", *EQUAL)
    private = _run(tmp_path, tiny_config, "dp", *EQUAL, f"privacy.client_dp='{mode}'", "privacy.noise_multiplier=0",
                   "privacy.clip_norm=inf")
    assert private["final"]["eval_loss"] == plain["final"]["eval_loss"]
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "dp")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert math.isinf(private["privacy"]["epsilon"])  # no noise: no guarantee, and the summary says so


def test_central_noise_std_is_z_clip_over_clients(tmp_path, tiny_config):
    cfg = tiny_config(*FAST, *EQUAL, "privacy.client_dp='central'", "privacy.noise_multiplier=0.8",
                      "privacy.clip_norm=0.3")
    dp = ClientDP(cfg)
    zeros = [{"w": torch.zeros(200_000)} for _ in range(3)]
    mean = dp.private_mean(zeros, [{}, {}, {}], round=1, clients=[0, 1, 2])
    assert mean["w"].std().item() == pytest.approx(0.8 * 0.3 / 3, rel=0.01)
    again = ClientDP(cfg).private_mean(zeros, [{}, {}, {}], round=1, clients=[0, 1, 2])
    assert torch.equal(mean["w"], again["w"])  # derived from seed and round: a resume draws the same noise
    assert dp.rounds == 1


def test_local_noise_is_added_by_each_client(tiny_config):
    dp = ClientDP(tiny_config(*FAST, "privacy.client_dp='local'", "privacy.noise_multiplier=2",
                              "privacy.clip_norm=0.1"))
    down = {"w": torch.zeros(100_000)}
    up, meta = dp.client_upload({"w": torch.ones(100_000)}, down, dp.instruction(), round=1, cid=0)
    noise = up["w"] - torch.ones(100_000) * (0.1 / math.sqrt(100_000))
    assert noise.std().item() == pytest.approx(2 * 0.1, rel=0.02)
    assert meta == {}  # local DP: the server learns nothing besides the noised upload (not even the norm)


def test_clipping_bounds_the_update_and_keeps_one_within():
    g = torch.Generator().manual_seed(0)
    down = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(3, generator=g)}
    up = {k: v + torch.randn(v.shape, generator=g) for k, v in down.items()}
    norm = update_norm(up, down)
    clipped, before = clip_upload(up, down, norm / 4)
    assert before == pytest.approx(norm) and update_norm(clipped, down) == pytest.approx(norm / 4, rel=1e-6)
    same, _ = clip_upload(up, down, norm * 2)
    assert same is up  # within the bound: the upload itself, untouched


def test_the_clip_bound_holds_on_every_upload_of_a_run(tmp_path, tiny_config, monkeypatch):
    from fedtune.paradigms.fedllm import FedLLM

    seen = []
    accept = FedLLM._accept

    def spy(self, reply):  # the upload as it reached the server, against what the client downloaded
        seen.append(update_norm(reply.upload.tensors, self.global_state))
        return accept(self, reply)

    monkeypatch.setattr(FedLLM, "_accept", spy)
    _run(tmp_path, tiny_config, "clipped", "privacy.client_dp='central'", "privacy.noise_multiplier=0.1",
         "privacy.clip_norm=0.05")
    assert len(seen) == 9  # 3 rounds x 3 clients
    assert max(seen) <= 0.05 * (1 + 1e-5) and min(seen) > 0.04  # trained updates are larger: every one was cut


def test_the_accountant_gives_the_librarys_own_figures():
    # every client every round: plain composition of Gaussian(z / 2) (sensitivity 2C of the sum, replace-one)
    acc = ClientAccountant(num_clients=4, per_round=4, delta=1e-5)
    rdp = RdpAccountant(neighboring_relation=REPLACE_ONE)
    rdp.compose(dp_accounting.GaussianDpEvent(1.5 / 2), 10)
    assert acc.epsilon(1.5, 10) == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-12)
    # the privacy-loss-distribution accountant handles replace-one itself (noise relative to one client's bound C):
    # its figure for z is a tight one, below RDP's bound and close to it, so the factor 2 above is the library's too
    pld = PLDAccountant(neighboring_relation=REPLACE_ONE)
    pld.compose(dp_accounting.GaussianDpEvent(1.5), 10)
    assert pld.get_epsilon(1e-5) <= acc.epsilon(1.5, 10) <= 1.3 * pld.get_epsilon(1e-5)
    # 10 of 100 clients a round: sampling without replacement amplifies
    sampled = ClientAccountant(num_clients=100, per_round=10, delta=1e-5)
    rdp = RdpAccountant(neighboring_relation=REPLACE_ONE)
    rdp.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.5)), 20)
    assert sampled.epsilon(1.0, 20) == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-12)
    assert sampled.epsilon(1.0, 20) < ClientAccountant(100, 100, 1e-5).epsilon(1.0, 20)
    # calibration: the smallest noise that spends the target over the planned rounds
    z = sampled.calibrate(4.0, 20)
    assert 4.0 * 0.999 <= sampled.epsilon(z, 20) <= 4.0


def test_the_run_reports_epsilon_every_round_and_in_summary_and_report(tmp_path, tiny_config):
    summary = _run(tmp_path, tiny_config, "dp", "privacy.client_dp='central'", "privacy.target_epsilon=6",
                   "privacy.clip_norm=0.5")
    eps = [r["epsilon"] for r in _metrics(tmp_path / "dp")[1:]]
    acc = ClientAccountant(3, 3, 1e-5)
    z = summary["privacy"]["noise_multiplier"]
    assert eps == pytest.approx([acc.epsilon(z, r) for r in (1, 2, 3)])
    assert eps[-1] == pytest.approx(6.0, rel=1e-3) and summary["privacy"]["epsilon"] == eps[-1]
    assert "Client-level DP" in (tmp_path / "dp" / "report.md").read_text()


def test_a_run_stops_before_the_round_that_would_exceed_its_budget_and_resumes_with_more(tmp_path, tiny_config):
    args = ("privacy.client_dp='central'", "privacy.noise_multiplier=2", "privacy.clip_norm=0.5")
    per_round = [ClientAccountant(3, 3, 1e-5).epsilon(2.0, r) for r in (1, 2, 3)]
    target = (per_round[1] + per_round[2]) / 2  # two rounds fit, three do not
    summary = _run(tmp_path, tiny_config, "budget", *args, f"privacy.target_epsilon={target}")
    assert summary["stopped"]["before_round"] == 3 and "target_epsilon" in summary["stopped"]["reason"]
    assert [r["round"] for r in _metrics(tmp_path / "budget")] == [0, 1, 2]
    assert summary["privacy"]["epsilon"] == pytest.approx(per_round[1]) and summary["privacy"]["epsilon"] <= target
    assert (tmp_path / "budget" / "checkpoints" / "latest").read_text().strip().endswith("2")
    assert "Stopped early" in (tmp_path / "budget" / "report.md").read_text()
    # a larger budget continues the same run to the end, as if it had never stopped
    cfg = tiny_config(*FAST, *args, f"privacy.target_epsilon={per_round[2] * 1.01}")
    resumed = Runner(cfg, tmp_path / "budget").run(resume=True)
    full = _run(tmp_path, tiny_config, "full", *args, f"privacy.target_epsilon={per_round[2] * 1.01}")
    assert resumed["final"] == full["final"] and "stopped" not in resumed


@pytest.mark.parametrize("args", [("privacy.client_dp='central'", "privacy.noise_multiplier=1",
                                   "privacy.adaptive_clip=true", "privacy.clipped_count_stddev=1"),
                                  ("privacy.client_dp='local'", "privacy.noise_multiplier=1")],
                         ids=["central-adaptive", "local"])
def test_resume_is_exact_with_dp(tmp_path, tiny_config, monkeypatch, args):
    from fedtune.paradigms.fedllm import FedLLM

    full = _run(tmp_path, tiny_config, "full", *args)
    resumed = crash_and_resume(monkeypatch, FedLLM, lambda: Runner(tiny_config(*FAST, *args), tmp_path / "crashed"))
    assert resumed["final"] == full["final"] and resumed["privacy"] == full["privacy"]


def test_adaptive_clipping_moves_the_bound_towards_the_quantile(tiny_config):
    dp = ClientDP(tiny_config(*FAST, "privacy.client_dp='central'", "privacy.noise_multiplier=1e-7",
                              "privacy.adaptive_clip=true", "privacy.clipped_count_stddev=1e-6",
                              "privacy.clip_lr=0.2", "privacy.clip_norm=1.0"))
    assert dp.z_update == pytest.approx((1e-14 ** -1 - (2e-6) ** -2) ** -0.5)
    ups = [{"w": torch.zeros(4)} for _ in range(3)]
    dp.private_mean(ups, [{"dp_under_clip": 1.0}] * 3, round=1, clients=[0, 1, 2])  # all under: shrink
    assert dp.clip == pytest.approx(math.exp(-0.2 * 0.5), rel=1e-5)
    dp.private_mean(ups, [{"dp_under_clip": 0.0}] * 3, round=2, clients=[0, 1, 2])  # all over: grow back
    assert dp.clip == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (("privacy.client_dp='central'",), "privacy.noise_multiplier or privacy.target_epsilon"),
    (("privacy.noise_multiplier=1",), "needs privacy.client_dp"),
    (("paradigm='split'", "privacy.client_dp='central'", "privacy.noise_multiplier=1"), "privacy.client_dp applies"),
    (("privacy.client_dp='central'", "privacy.noise_multiplier=1", "pruning.rates=[0.3]"), "pruned clients"),
    (("privacy.client_dp='central'", "privacy.noise_multiplier=1", "federation.strategy='scaffold'"),
     "whole update"),
    (("privacy.client_dp='central'", "privacy.noise_multiplier=1", "privacy.adaptive_clip=true"),
     "clipped_count_stddev"),
    (("privacy.client_dp='local'", "privacy.noise_multiplier=1", "privacy.adaptive_clip=true"),
     "client_dp = 'central'"),
])
def test_settings_that_cannot_go_together_are_refused_by_name(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


# --- sample-level DP-SGD (Opacus) ----------------------------------------------------------------------------


def _batches(vocab: int, n: int = 3):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (8, 12), generator=g)  # train.batch_size: DP-SGD divides by it
        labels = ids.clone()
        labels[:, :5] = -100  # the prompt
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _train(cfg, private: bool):
    from fedtune.engine.context import build_model
    from fedtune.models.flops import model_cost
    from fedtune.models.lora import adapter_state, trainable_parameters
    from fedtune.privacy.run_privacy import RunPrivacy
    from fedtune.training.steps import sample_mean_loss, train_steps

    _, model = build_model(cfg, torch.device("cpu"))
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.5)  # Adam would magnify float noise near 0
    torch.manual_seed(0)
    with RunPrivacy(cfg).training(model, optimizer, 1, 0) if private else nullcontext((model, optimizer)) as (run, step):
        train_steps(run, step, _batches(cfg.model.tiny.vocab_size), cost=model_cost(model),
                    device=torch.device("cpu"), max_grad_norm=None, loss_fn=sample_mean_loss)
    unchanged = all(torch.equal(frozen[k], v) for k, v in model.named_parameters() if not v.requires_grad)
    leftover = [n for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None]
    return adapter_state(model), unchanged, leftover


def test_dp_sgd_without_noise_or_clip_is_plain_training_on_the_per_sample_loss(tiny_config):
    cfg = tiny_config("privacy.sample_dp=true", "privacy.sample_noise_multiplier=0", "privacy.sample_clip_norm=1e9",
                      "lora.dropout=0")
    private, unchanged, leftover = _train(cfg, private=True)
    plain, _, _ = _train(cfg, private=False)
    assert unchanged and not leftover  # only LoRA weights train; Opacus's hooks and per-sample grads are gone
    for key in plain:
        torch.testing.assert_close(private[key], plain[key], rtol=1e-4, atol=1e-6)
    clipped, _, _ = _train(tiny_config("privacy.sample_dp=true", "privacy.sample_noise_multiplier=0",
                                       "privacy.sample_clip_norm=1e-4", "lora.dropout=0"), private=True)
    assert any(not torch.allclose(clipped[k], plain[k], atol=1e-6) for k in plain)  # the clip acts


def test_the_dp_sgd_accountant_gives_opacus_own_figure():
    from opacus.accountants import RDPAccountant

    from fedtune.privacy.dp_sgd import sample_epsilon

    opacus = RDPAccountant()
    for _ in range(60):
        opacus.step(noise_multiplier=1.1, sample_rate=0.05)
    assert sample_epsilon(1.1, 0.05, 60, 1e-5) == pytest.approx(opacus.get_epsilon(1e-5), rel=0.03)


def test_a_dp_sgd_run_reports_each_round_and_the_largest_clients_epsilon(tmp_path, tiny_config):
    from fedtune.privacy.dp_sgd import sample_epsilon

    summary = _run(tmp_path, tiny_config, "dpsgd", "privacy.sample_dp=true", "privacy.sample_noise_multiplier=1.2")
    sizes = [c["num_samples"] for c in summary["clients"]]
    expected = max(sample_epsilon(1.2, 8 / n, 3 * 3, 1e-5) for n in sizes)  # batch 8, 3 steps a round, 3 rounds
    assert summary["privacy"]["sample_dp"]["epsilon"] == pytest.approx(expected)
    assert _metrics(tmp_path / "dpsgd")[-1]["sample_epsilon"] == pytest.approx(expected)
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]


@pytest.mark.parametrize("overrides, message", [
    (("privacy.sample_dp=true", "federation.strategy='fedprox'"), "per-sample gradients"),
    (("paradigm='kd'", "privacy.sample_dp=true"), "privacy.sample_dp applies"),
])
def test_dp_sgd_refuses_what_it_cannot_bound(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


# --- KD-FedLLM: client-level DP of the soft labels -------------------------------------------------------------

KD = ("paradigm='kd'", "kd.server_model=true", "kd.public_samples=8")


def test_kd_clients_share_clipped_probabilities_at_the_servers_candidates(tmp_path, tiny_config, monkeypatch):
    from fedtune.paradigms.kd import KDFed

    seen = []
    accept = KDFed._accept

    def spy(self, reply):  # what reached the server, and the candidates it had chosen for the round
        if reply.upload.kind != "client_failure":
            seen.append((reply.upload.tensors["probs"].clone(), self.candidates.clone()))
        return accept(self, reply)

    monkeypatch.setattr(KDFed, "_accept", spy)
    summary = _run(tmp_path, tiny_config, "kd", *KD, "privacy.client_dp='central'", "privacy.noise_multiplier=1",
                   "privacy.clip_norm=0.5", "kd.topk=4")
    assert len(seen) == 9
    for probs, candidates in seen:
        assert probs.shape == candidates.shape and candidates.shape[1] == 4
        assert probs.norm().item() <= 0.5 * (1 + 1e-5) and (probs >= 0).all()  # clipped, not noised: central
    eps = [r["epsilon"] for r in _metrics(tmp_path / "kd")[1:]]
    assert eps == pytest.approx([ClientAccountant(3, 3, 1e-5).epsilon(1.0, r) for r in (1, 2, 3)])
    assert summary["privacy"]["epsilon"] == eps[-1] and summary["kd"]["evaluated_model"] == "server"


def test_kd_private_soft_labels_are_the_renormalised_mean_without_noise():
    from fedtune.kd.aggregation import private_soft_labels

    mean = torch.tensor([[0.2, 0.1, -0.05], [0.0, 0.0, 0.0]])
    soft = private_soft_labels(mean, torch.tensor([[5, 1, 2], [0, 3, 4]]))
    torch.testing.assert_close(soft.probs[0], torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert soft.mask.tolist() == [True, False] and soft.indices.dtype == torch.int32


def test_kd_resume_is_exact_with_dp(tmp_path, tiny_config, monkeypatch):
    from fedtune.paradigms.kd import KDFed

    args = (*KD, "privacy.client_dp='local'", "privacy.noise_multiplier=1", "privacy.clip_norm=0.5")
    full = _run(tmp_path, tiny_config, "full", *args)
    resumed = crash_and_resume(monkeypatch, KDFed, lambda: Runner(tiny_config(*FAST, *args), tmp_path / "crashed"))
    assert resumed["final"] == full["final"] and resumed["privacy"] == full["privacy"]


def test_kd_dp_needs_the_servers_model(tiny_config):
    with pytest.raises(ConfigError, match="kd.server_model = true"):
        tiny_config("paradigm='kd'", "privacy.client_dp='central'", "privacy.noise_multiplier=1")
