import json

from automlprune.cli.main import main


def test_quick_engine_benchmark_writes_a_report(tmp_path, capsys):
    assert main(["benchmark", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cost_model"][0]["exact"] is True
    assert report["cost_model"][0]["cost_model_us"] > 0 and report["evaluator"]["overhead_ratio"] >= 1
    assert [row["target_macs"] for row in report["latency"]] == [0.7, 0.5, 0.3]
    assert all(row["macs_ratio"] <= row["target_macs"] + 1e-9 for row in report["latency"])
    assert report["latency_table"]["rows"] and report["latency_table"]["median_abs_error"] >= 0
    text = (tmp_path / "report.md").read_text()
    assert "FlopCounterMode" in text and (tmp_path / "latency_vs_macs.png").stat().st_size > 1000


def test_criteria_benchmark_writes_a_table(tmp_path, capsys):
    checkpoint = tmp_path / "c.pt"
    assert main(["train", "digits-cnn", "--set", f"checkpoint={checkpoint}", "--set", "train.epochs=2", "--json"]) == 0
    from automlprune.benchmarks.criteria import run_criteria_benchmark

    report = run_criteria_benchmark("digits-cnn", tmp_path / "out", "cpu", targets=(0.5,), finetune_steps=2,
                                    criteria=["l1", "random", "taylor"], overrides=[f"checkpoint={checkpoint}"], progress=False)
    assert [r["criterion"] for r in report["rows"]] == ["l1", "random", "taylor"]
    assert all(r["macs_fraction"] <= 0.5 and 0 <= r["test_accuracy_finetuned"] <= 1 for r in report["rows"])
    assert "| taylor |" in (tmp_path / "out" / "criteria.md").read_text()
