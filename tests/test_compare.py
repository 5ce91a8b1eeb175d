"""``fedtune compare``: every paradigm on one setting, sweeps, the report, refusal of a different plan, resume."""

from __future__ import annotations

import json

import pytest

from fedtune.cli import main
from fedtune.core.errors import ConfigError, FedtuneError
from fedtune.engine import compare as compare_mod
from fedtune.engine.compare import ComparisonPlan, Sweep, run_comparison
from fedtune.report.comparison import bytes_to_target, default_target, simulated_to_target

FAST = ["federation.rounds=1", "train.local_steps=2", "eval.metric=none", "kd.public_samples=16",
        "data.max_train_samples=96", "data.max_eval_samples=16", "federation.num_clients=2"]


def _plan(**kw) -> ComparisonPlan:
    from conftest import TINY

    return ComparisonPlan(config=str(TINY), paradigms=kw.pop("paradigms", ["fedllm", "kd"]),
                          overrides=FAST + kw.pop("overrides", []), **kw)


def test_sweep_parsing_aliases_and_errors():
    assert Sweep.parse("clients=2,4") == Sweep("federation.num_clients", ("2", "4"))
    assert Sweep.parse("kd.topk=4, 8") == Sweep("kd.topk", ("4", "8"))
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        Sweep.parse("clients")
    assert Sweep("kd.topk", ("4",)).affects("kd") and not Sweep("kd.topk", ("4",)).affects("fedllm")
    assert Sweep("split.cut", ("1",)).affects("split") and Sweep("lora.r", ("4",)).affects("fedllm")


def test_every_sweep_alias_names_a_real_key_and_runs(tmp_path):
    from fedtune.config import describe_fields, load_config

    assert set(compare_mod.SWEEP_ALIASES.values()) <= {key for key, _, _ in describe_fields()}
    values = {"clients": "3", "alpha": "5.0", "rank": "4", "cut": "1", "topk": "4"}
    assert set(values) == set(compare_mod.SWEEP_ALIASES)
    plan = _plan(paradigms=["split", "kd"], baselines=False,
                 sweeps=[Sweep.parse(f"{alias}={value}") for alias, value in values.items()])
    run_comparison(plan, tmp_path / "aliases")
    for paradigm in ("split", "kd"):
        run_dir = next((tmp_path / "aliases" / "runs").glob(f"{paradigm},*"))
        assert (run_dir / "summary.json").is_file()
        cfg = load_config(run_dir / "config.toml")
        for alias, value in values.items():
            sweep = Sweep.parse(f"{alias}={value}")
            if sweep.affects(paradigm):
                section, key = sweep.key.split(".")
                assert float(getattr(getattr(cfg, section), key)) == float(value), (paradigm, alias)


def test_bytes_to_target_is_the_cumulative_total_at_the_first_eval_reaching_it():
    metrics = [{"eval_loss": 3.0, "cum_uplink_bytes": 0, "cum_downlink_bytes": 0},
               {"eval_loss": None, "cum_uplink_bytes": 10, "cum_downlink_bytes": 5},
               {"eval_loss": 2.0, "cum_uplink_bytes": 20, "cum_downlink_bytes": 10},
               {"eval_loss": 1.5, "cum_uplink_bytes": 30, "cum_downlink_bytes": 15}]
    assert bytes_to_target(metrics, 2.5) == 30 and bytes_to_target(metrics, 3.0) == 0
    assert bytes_to_target(metrics, 1.0) is None
    timed = [{**row, "sim_s": s} for row, s in zip(metrics, (0.0, 1.5, 2.0, 4.0))]
    assert simulated_to_target(timed, 2.5) == 3.5 and simulated_to_target(timed, 1.0) is None


def test_default_target_ignores_runs_that_got_worse():
    def summary(initial, final):
        return {"initial": {"eval_loss": initial}, "final": {"eval_loss": final}}

    assert default_target([summary(3.0, 2.0), summary(3.0, 2.4), summary(3.0, 3.3)]) == 2.4
    assert default_target([summary(3.0, 3.3)]) is None


def test_a_bad_sweep_value_is_refused_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="federation.num_clients"):
        run_comparison(_plan(sweeps=[Sweep.parse("clients=2,0")]), tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_compare_sweep_report_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    plan = _plan(sweeps=[Sweep.parse("topk=2,4")])
    real_run = compare_mod._run_one
    calls = []

    def interrupted(cfg, run_dir, console):  # the third run is "killed" before it finishes
        calls.append(run_dir.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(cfg, run_dir, console)

    monkeypatch.setattr(compare_mod, "_run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(plan, out)
    monkeypatch.setattr(compare_mod, "_run_one", real_run)
    first = (out / "runs" / "fedllm" / "summary.json").stat().st_mtime_ns

    report = run_comparison(plan, out)  # resumes: finished runs are reused
    assert (out / "runs" / "fedllm" / "summary.json").stat().st_mtime_ns == first
    # a kd.* sweep reruns only KD; FedLLM and the baselines run once and appear in both tables
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["centralized", "fedllm", "kd,kd.topk=2", "kd,kd.topk=4", "local"]
    data = json.loads((out / "compare.json").read_text())
    assert [c["cell"] for c in data] == [{"kd.topk": "2"}, {"kd.topk": "4"}]
    for cell in data:
        rows = {r["paradigm"]: r for r in cell["rows"]}
        assert list(rows) == ["fedllm", "kd", "centralized", "local"]
        assert rows["local"]["uplink_bytes"] == 0 and rows["local"]["downlink_bytes"] == 0
        fedllm = json.loads((out / "runs" / "fedllm" / "summary.json").read_text())
        assert rows["fedllm"]["uplink_bytes"] == fedllm["comm"]["uplink_bytes"]
        improved = [rows[p]["final_eval_loss"] for p in ("fedllm", "kd")
                    if rows[p]["final_eval_loss"] < rows[p]["initial_eval_loss"]]
        assert improved and cell["target_loss"] == pytest.approx(max(improved))
        assert rows["fedllm"]["bytes_to_target"] > 0  # reached after training, not at round 0
    kd2, kd4 = (json.loads((out / "runs" / f"kd,kd.topk={k}" / "summary.json").read_text()) for k in (2, 4))
    assert kd2["comm"]["uplink_bytes"] < kd4["comm"]["uplink_bytes"]  # top-k drives KD's payload
    text = report.read_text()
    assert text.count("## kd.topk = ") == 2 and (out / "compare-0.png").is_file() and (out / "compare-1.png").is_file()
    assert "least communication (bytes): kd" in text

    with pytest.raises(FedtuneError, match="holds a different comparison"):
        run_comparison(_plan(sweeps=[Sweep.parse("topk=2,8")]), out)


def test_compare_command_line(tmp_path, capsys):
    from conftest import TINY

    out = tmp_path / "cli"
    args = ["compare", str(TINY), "--paradigms", "fedllm", "--no-baselines", "--out", str(out)]
    assert main([*args, *[x for kv in FAST for x in ("--set", kv)]]) == 0
    assert json.loads((out / "compare.json").read_text())[0]["rows"][0]["paradigm"] == "fedllm"
    assert main([*args, "--paradigms", "nope"]) == 2
