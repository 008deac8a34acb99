"""The latency suite: where the time goes, alignment and the latency table's error."""

import json

import numpy as np
import pytest
import torch

from automlprune.benchmarks.latency import (ALIGNMENTS, CATEGORIES, alignment_gains, category, deployable_forms,
                                            recommended_round_to, time_breakdown, uniform_at)
from automlprune.cli.main import main
from automlprune.materialize import materialize


def test_alignment_gain_finds_a_staircase_and_ignores_an_affine_trend():
    widths = range(16, 65)
    affine = {w: 0.05 + 0.01 * w for w in widths}
    gains = alignment_gains(affine)
    assert all(g == pytest.approx(1.0, abs=1e-9) for g in gains.values())
    assert recommended_round_to(gains) == 1
    staircase = {w: 0.05 + 0.01 * 8 * -(-w // 8) for w in widths}  # every width costs its next multiple of 8
    gains = alignment_gains(staircase)
    assert gains[8] > 1.03 and gains[8] > gains[4] > gains[2] > gains[1] == pytest.approx(1.0)
    assert recommended_round_to(gains) == 8
    assert set(gains) == set(ALIGNMENTS)


def test_operators_fall_into_the_breakdown_kinds():
    assert category("aten::mkldnn_convolution") == "convolution"
    assert category("aten::native_batch_norm") == "batch norm"
    assert category("aten::relu_") == category("aten::hardtanh") == "activation"
    assert category("aten::add_") == "residual add"
    assert category("aten::max_pool2d_with_indices") == category("aten::adaptive_avg_pool2d") == "pooling"
    assert category("aten::addmm") == "linear"
    assert category("aten::contiguous") == "memory/layout"
    assert category("aten::something_new") == "other ops"


def test_deployable_forms_compute_the_same_and_the_breakdown_sums_to_the_latency(trained_digits_model):
    x = torch.randn(1, 1, 8, 8)
    space, candidate, fraction = uniform_at(trained_digits_model, x, 0.5, round_to=8)
    assert fraction <= 0.5
    widths = space.kept_channels(candidate)
    assert all(k % 8 == 0 or k == g.channels for k, g in zip(widths, space.groups))
    net = materialize(trained_digits_model, candidate, space).eval()
    xb = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        outputs = {form: m(xb) for form, m in deployable_forms(net).items()}
    for out in outputs.values():
        assert torch.allclose(out, outputs["module"], atol=1e-4)
    kinds = time_breakdown(net, xb, repeats=3, latency_ms=2.0)
    assert list(kinds) == list(CATEGORIES)
    assert sum(kinds.values()) == pytest.approx(2.0)
    assert kinds["convolution"] > 0 and kinds["batch norm"] > 0


def test_latency_suite_writes_its_report_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "latency"
    assert main(["benchmark", "--suite", "latency", "--subjects", "digits-cnn", "--candidates", "1", "--round-to", "8",
                 "--out", str(out)]) == 0
    report = json.loads((out / "latency.json").read_text())
    subject = report["subjects"][0]
    networks = {(r["network"], r["form"]) for r in subject["latency"]}
    assert ("uniform 50% (round_to 8)", "folded, channels-last") in networks and ("unpruned", "module") in networks
    for row in subject["breakdown"]:
        measured = next(r["ms"][str(row["batch"])] for r in subject["latency"]
                        if r["network"] == row["network"] and r["form"] == row["form"])
        assert sum(row["ms"].values()) == pytest.approx(measured)
    assert {r["batch"] for r in subject["alignment"]} == {1, 64}
    kinds = [r["network"] for r in subject["table_error"]["rows"]]
    assert "random 0 (irregular)" in kinds and "random 0 (round_to 8)" in kinds
    assert all(np.isfinite(r["error"]) and np.isfinite(r["ratio_error"]) for r in subject["table_error"]["rows"])
    assert subject["table_error"]["unpruned"]["macs_fraction"] == pytest.approx(1.0)
    text = (out / "report.md").read_text()
    assert "Where the time goes" in text and "recommended round_to" in text and (out / "digits-cnn.png").stat().st_size > 0
    mtime = (out / "subjects" / "digits-cnn.json").stat().st_mtime_ns
    assert main(["benchmark", "--suite", "latency", "--subjects", "digits-cnn", "--out", str(out)]) == 0  # served, not measured again
    assert (out / "subjects" / "digits-cnn.json").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert main(["benchmark", "--suite", "latency", "--round-to", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--round-to" in capsys.readouterr().err
    assert main(["benchmark", "--suite", "latency", "--subjects", "no-such-task", "--out", str(tmp_path / "y")]) == 2
    assert main(["benchmark", "--suite", "latency", "--subjects", "torchvision:mobilenet_v2@big", "--out", str(tmp_path / "z")]) == 2


def test_deployable_form_takes_non_image_inputs_and_leaves_the_model_alone():
    from torch import nn

    from automlprune.export import deployable

    mlp = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(deployable(mlp)(x), mlp(x), atol=1e-6)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    deployed = deployable(conv)
    assert conv[0].weight.is_contiguous() and deployed.net.training is False  # the caller's model keeps its layout
    with torch.no_grad():
        assert torch.allclose(deployed(torch.ones(2, 3, 6, 6)), conv(torch.ones(2, 3, 6, 6)), atol=1e-5)
