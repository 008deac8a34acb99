"""Compression pipelines (issue 19): stages of one run, carried bits and sparsity, the unpruned
network as every stage's reference, resume after kill -9, bad pipeline files, and the report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from automlprune.cli.main import main
from automlprune.cost import CostModel, count_macs
from automlprune.errors import CandidateError, ConfigError
from automlprune.export import load_packed
from automlprune.search.pipeline_spec import PipelineSpec
from automlprune.space import Candidate, SearchSpace
from automlprune.space.config import SpaceConfig
from automlprune.sparsity.patterns import Kernel

from conftest import assert_drawn

# channels -> fine-tune -> kernels (information dropout) -> bits -> fine-tune, small enough for digits
THREE_STAGES = {
    "description": "test: channels, kernels, bits",
    "stages": [
        {"name": "channels", "strategy": "prunenet", "budget": "macs=0.5", "finetune": 1},
        {"name": "kernels", "strategy": "information-dropout", "space": "kernel-sparse", "budget": "bytes=0.35",
         "options": {"epochs": 1, "retrain_epochs": 0}},
        {"name": "bits", "strategy": "optuna-random", "space": "bits-only", "evals": 6, "finetune": 1},
    ],
}


def _write(tmp_path, data, name="p"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_three_stage_pipeline_meets_every_budget_and_exports_its_reported_size(tmp_path, checkpoint, capsys):
    pipeline = _write(tmp_path, THREE_STAGES)
    run_dir = tmp_path / "run"
    code, out, err = _run(["pipeline", "digits-cnn", str(pipeline), "--budget", "bytes=0.1", "--run-dir", str(run_dir),
                           "--set", f"checkpoint={checkpoint}", "--json"], capsys)
    assert code == 0, err
    payload = json.loads(out)
    stages = payload["stages"]
    assert [s["name"] for s in stages] == ["channels", "kernels", "bits"]
    limits = {"channels": ("macs", 0.5), "kernels": ("bytes", 0.35), "bits": ("bytes", 0.1)}
    for stage in stages:  # every answer within its own stage's budget, as a fraction of the UNPRUNED network
        metric, limit = limits[stage["name"]]
        assert stage["answer"]["relative"][metric] <= limit * (1 + 1e-9)
        assert stage["budget_fraction"] == pytest.approx(limit)
    assert stages[1]["input"]["macs"] == pytest.approx(stages[0]["answer"]["relative"]["macs"])  # stage 2 starts where 1 ended
    assert stages[2]["answer"]["relative"]["macs"] == pytest.approx(stages[0]["answer"]["relative"]["macs"])  # bits keep the widths
    assert stages[0]["finetune"]["epochs"] == 1 and stages[1]["finetune"] is None and stages[2]["finetune"]["epochs"] == 1
    # the kernel stage's sparsity is carried into the bits stage: its answer is sparse AND quantized
    kernels = Candidate.from_dict(stages[1]["answer"]["candidate"])
    assert kernels.densities and set(dict(kernels.patterns).values()) == {"kernel"}
    assert stages[2]["answer"]["candidate"]["bits"]
    # the final network: its packed file holds the reported bytes, whole kernels are zero, and MACs match PyTorch's counter
    export = payload["export"]
    net = load_packed(export["packed"]).eval()
    assert export["reported_bytes"] <= export["file_bytes"] < export["reported_bytes"] + 4096
    assert export["reported_bytes"] / stages[2]["answer"]["relative"]["bytes"] == pytest.approx(
        stages[0]["answer"]["bytes"] / stages[0]["answer"]["relative"]["bytes"])  # one reference: the unpruned network
    for layer, density in kernels.densities:
        weight = net.get_submodule(layer).weight
        per_kernel = weight.reshape(weight.shape[0], weight.shape[1], -1)
        removed = per_kernel.abs().sum(-1) == 0
        assert int((~removed).sum()) == round(density * removed.numel())
    x = torch.randn(1, 1, 8, 8)
    assert count_macs(net, x) == pytest.approx(stages[2]["answer"]["macs"])
    exported = torch.export.load(export["pt2"]).module()
    assert torch.allclose(exported(x), net(x), atol=1e-4)
    # test accuracy of the final fine-tuned network is what the report's last stage says
    assert 0.5 < stages[2]["test_accuracy"] <= 1.0
    report = Path(payload["report"]).read_text()
    assert "| 3. bits | optuna-random | bytes=0.1 |" in report and "Packed export" in report
    assert_drawn(payload["plot"])
    # each stage is a study of the run's store, named by the pipeline, the stage and what it depends on
    names = optuna.get_all_study_names(f"sqlite:///{run_dir / 'study.db'}")
    assert sum(n.startswith("p/stage") for n in names) == 3


def test_a_rerun_reuses_finished_stages_and_another_final_budget_shares_them(tmp_path, checkpoint, capsys):
    spec = {"stages": [THREE_STAGES["stages"][0], {"name": "bits", "strategy": "optuna-random", "space": "bits-only", "evals": 4}]}
    pipeline, run_dir = _write(tmp_path, spec), tmp_path / "run"
    args = ["pipeline", "digits-cnn", str(pipeline), "--run-dir", str(run_dir), "--set", f"checkpoint={checkpoint}", "--json", "--no-export"]
    code, first, err = _run(args + ["--budget", "bytes=0.2"], capsys)
    assert code == 0, err
    network = run_dir / json.loads(first)["stages"][0]["network_path"]
    stamp = network.stat().st_mtime_ns
    code, again, err = _run(args + ["--budget", "bytes=0.2"], capsys)
    assert code == 0, err
    def without_time(stages):
        return [{k: v for k, v in s.items() if k != "seconds"} for s in stages]

    assert without_time(json.loads(again)["stages"]) == without_time(json.loads(first)["stages"])  # served from the store and saved networks
    code, other, err = _run(args + ["--budget", "bytes=0.15"], capsys)
    assert code == 0, err
    assert network.stat().st_mtime_ns == stamp  # stage 1 was not run again for the other final budget
    assert without_time(json.loads(other)["stages"])[0] == without_time(json.loads(first)["stages"])[0]
    assert json.loads(other)["stages"][1]["answer"]["relative"]["bytes"] <= 0.15


@pytest.mark.slow
def test_kill_9_in_stage_2_resumes_at_stage_2(tmp_path, checkpoint):
    spec = {"stages": [THREE_STAGES["stages"][0],
                       {"name": "bits", "strategy": "optuna-random", "space": "bits-only", "evals": 40, "budget": "bytes=0.15"}]}
    pipeline, run_dir = _write(tmp_path, spec), tmp_path / "run"
    command = [sys.executable, "-m", "automlprune.cli.main", "pipeline", "digits-cnn", str(pipeline), "--run-dir", str(run_dir),
               "--set", f"checkpoint={checkpoint}", "--set", "evaluation.bn_batches=30", "--json", "--no-export"]
    from conftest import evaluated_trials

    def evaluated(stage):  # read while the pipeline may be creating the database
        return evaluated_trials(run_dir, f"p/stage{stage}-")

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while evaluated(2) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline ended before it could be killed: " + proc.stderr.read().decode()[-500:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stage1 = next((run_dir / "pipeline").glob("stage1-*.pt"))
    stamp, before = stage1.stat().st_mtime_ns, evaluated(2)
    assert 5 <= before < 40 and evaluated(1) == 1
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    assert stage1.stat().st_mtime_ns == stamp and evaluated(1) == 1  # stage 1 neither searched nor fine-tuned again
    assert evaluated(2) == 40  # stage 2 went on from where it was killed, nothing repeated
    assert json.loads(resumed.stdout)["stages"][1]["answer"]["relative"]["bytes"] <= 0.15


@pytest.mark.parametrize("change,message", [
    ({"stages": [{"strategy": "no-such-strategy", "budget": "macs=0.5"}]}, "no-such-strategy"),
    ({"stages": [{"strategy": "prunenet", "budget": "macs=0.5", "finetun": 2}]}, "finetun"),
    ({"stages": [{"strategy": "prunenet", "budget": "macs=0.5"}], "stagez": []}, "stagez"),
    ({"stages": [{"strategy": "prunenet", "budget": "macs=0.5"}, {"strategy": "uniform", "budget": "macs=0.6"}]}, "not tighter"),
    ({"stages": [{"strategy": "prunenet", "budget": "macs=0.5"}, {"strategy": "haq", "space": "bits-only", "budget": "macs=0.3"}]},
     "cannot lower macs"),
    ({"stages": [{"strategy": "prunenet", "budget": "macs=0.5"}, {"strategy": "optuna-random", "space": "bits-only",
                                                                  "budget": "bytes=0.9", "evals": 2}]}, "looser than"),
    ({"stages": [{"strategy": "prunenet", "budget": "accuracy_drop=1"}]}, "tolerances are not supported"),
    ({"stages": [{"strategy": "prunenet", "budget": "macs=0.5", "options": {"nonsense": 1}}]}, "nonsense"),
    ({"stages": [{"strategy": "prunenet"}, {"strategy": "uniform", "budget": "macs=0.3"}]}, "no budget"),
])
def test_bad_pipeline_files_end_in_one_sentence_and_exit_code_2(tmp_path, checkpoint, capsys, change, message):
    pipeline = _write(tmp_path, change)
    run_dir = tmp_path / "run"
    code, out, err = _run(["pipeline", "digits-cnn", str(pipeline), "--run-dir", str(run_dir), "--set", f"checkpoint={checkpoint}",
                           "--no-export"], capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("automlprune: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_a_pipeline_without_a_final_budget_asks_for_one_and_unknown_names_are_refused(tmp_path, capsys):
    code, _, err = _run(["pipeline", "digits-cnn", "channels-then-bits"], capsys)
    assert code == 2 and "--budget" in err
    code, _, err = _run(["pipeline", "digits-cnn", "no-such-pipeline", "--budget", "bytes=0.1"], capsys)
    assert code == 2 and "two-stage-drl" in err  # the shipped ones are named
    for name in ("two-stage-drl", "channels-then-bits"):  # the shipped files parse and check
        spec = PipelineSpec.load(name).with_final_budget("bytes=0.125")
        assert spec.stages[-1].budget == "bytes=0.125"
    with pytest.raises(ConfigError, match="not tighter"):
        PipelineSpec.load("two-stage-drl").with_final_budget("bytes=0.5")  # its kernel stage already reaches 0.35
    mixed = {"stages": [{"strategy": "prunenet", "budget": "bytes=0.5"}, {"strategy": "uniform", "budget": "bytes=20k"}]}
    assert PipelineSpec.from_dict(mixed).stages[1].budget == "bytes=20k"  # a fraction and an amount: compared on the network


def test_carried_settings_hold_where_the_space_does_not_search_them(trained_digits_model, digits):
    bits_only = SearchSpace(trained_digits_model, digits.example_input(), SpaceConfig.load("automlprune/search_spaces/bits-only.yaml"))
    assert not bits_only.prunable  # a space that keeps every channel searches no width
    plain = CostModel(bits_only)(Candidate.make())["bytes"]
    bits_only.carry({"features.3": 4}, {"features.7": ("kernel", 0.5)})
    carried = CostModel(bits_only)
    resolved = bits_only.resolve(Candidate.make())
    assert resolved.sparsity["features.7"] == (Kernel(), 0.5) and resolved.candidate == Candidate.make()  # keys unchanged
    assert resolved.bits["features.3"] == 32  # bits are searched there in this space: the candidate decides (none: float)
    assert carried(Candidate.make())["bytes"] < plain  # the carried sparsity is costed
    fixed = SearchSpace(trained_digits_model, digits.example_input())  # the default space searches no bits
    fixed.carry({"features.3": 4}, {})
    assert fixed.resolve(Candidate.make()).bits["features.3"] == 4 and fixed.fixed_bits == {"features.3": 4}
    with pytest.raises(CandidateError, match="not a Conv2d/Linear"):
        fixed.carry({"nowhere": 4}, {})


def test_compare_puts_a_pipeline_beside_single_strategies(tmp_path, checkpoint, capsys):
    spec = {"stages": [THREE_STAGES["stages"][0], {"name": "bits", "strategy": "optuna-random", "space": "bits-only", "evals": 4,
                                                   "finetune": 1}]}
    pipeline, run_dir = _write(tmp_path, spec, "cb"), tmp_path / "compare"
    args = ["compare", "digits-cnn", "--strategies", f"uniform,pipeline:{pipeline}", "--budgets", "bytes=0.3,0.2", "--evals", "3",
            "--finetune-epochs", "1", "--run-dir", str(run_dir), "--set", f"checkpoint={checkpoint}", "--json"]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    rows = {(r["strategy"], r["budget"]): r for r in json.loads((run_dir / "results.json").read_text())["rows"]}
    assert set(rows) == {("uniform", "bytes=0.3"), ("uniform", "bytes=0.2"), ("pipeline:cb", "bytes=0.3"), ("pipeline:cb", "bytes=0.2")}
    for label, limit in (("bytes=0.3", 0.3), ("bytes=0.2", 0.2)):
        row = rows[("pipeline:cb", label)]
        assert row["bytes_fraction"] <= limit and row["macs_fraction"] <= 0.5  # its final network, against the unpruned one
        assert 0.5 < row["test_accuracy"] <= 1 and row["latency_ms_b1"] > 0  # fine-tuned by its stages, timed with the others
        assert row["evaluations"] == 1 + 4  # every stage's evaluations
        assert row["finetune_images"] > 0 and row["training_images"] > 0  # the last fine-tune, and the earlier one
    assert "pipeline:cb" in (run_dir / "report.md").read_text()
    assert not [n for n in optuna.get_all_study_names(f"sqlite:///{run_dir / 'study.db'}") if n.startswith("prunenet|")]  # stages stay inside
    stage1 = next((run_dir / "pipeline").glob("stage1-*.pt"))
    stamp = stage1.stat().st_mtime_ns
    code, _, err = _run(args, capsys)  # a rerun serves everything from the store
    assert code == 0, err
    assert stage1.stat().st_mtime_ns == stamp
    at = args.index("--finetune-epochs")
    code, _, err = _run(args[:at] + ["--train-budget", "2"] + args[at + 2:], capsys)
    assert code == 2 and "--train-budget" in err


def test_information_dropout_noise_kl_and_removal(trained_digits_model, digits):
    from automlprune.search.base import SearchContext
    from automlprune.search.budget import parse_budget
    from automlprune.search.information_dropout import InformationDropoutStrategy, KernelNoise

    weight = torch.randn(4, 3, 3, 3)
    noise = KernelNoise(weight, max_alpha=0.7, init_alpha=0.05)
    assert torch.allclose(noise.alpha(), torch.full((4, 3), 0.05))
    assert float(noise.kl().detach()) == pytest.approx(-12 * float(torch.log(torch.tensor(0.05 / 0.701))), rel=1e-5)
    noisy = noise.train()(weight).detach()
    ratio = (noisy / weight).reshape(4, 3, 9)
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio)) and not torch.allclose(ratio, torch.ones_like(ratio))  # one draw per kernel
    assert torch.equal(noise.eval()(weight), weight)  # no noise at evaluation

    config = SpaceConfig(ratios=(1.0,), densities=(0.1, 0.5, 1.0), patterns=("kernel",))
    space = SearchSpace(trained_digits_model, digits.example_input(), config)
    context = SearchContext(space, CostModel(space), model=trained_digits_model, data=digits)
    layers = list(space.layer_patterns)
    assert layers == ["features.3", "features.7"]  # the 3x3 convs between the dense first and last layers
    shapes = {l: space.layer_by_name[l] for l in layers}
    alphas = {l: torch.rand(s.out_channels, s.in_channels, generator=torch.Generator().manual_seed(i)) * 0.5
              for i, (l, s) in enumerate(shapes.items())}
    alphas["features.3"][0, :3] = 0.69  # saturated (>= 0.9 x 0.7)
    loose = InformationDropoutStrategy(context, parse_budget("bytes=1"), epochs=1)
    kept = loose.removal(alphas)
    assert int((~kept["features.3"]).sum()) == 3 and bool(kept["features.7"].all())  # saturated kernels go, whatever the budget
    tight = InformationDropoutStrategy(context, parse_budget("bytes=0.6"), epochs=1)
    kept = tight.removal(alphas)
    assert tight.feasible(tight._densities({l: int(m.sum()) for l, m in kept.items()}))
    threshold = max(float(alphas[l][kept[l]].max()) for l in layers)
    assert all(bool((alphas[l][~kept[l]] >= threshold).all()) for l in layers)  # removed in decreasing order of alpha, globally
    with pytest.raises(ConfigError, match="one kernel left"):
        InformationDropoutStrategy(context, parse_budget("bytes=0.1"), epochs=1)
