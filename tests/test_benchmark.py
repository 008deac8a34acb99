import json
import statistics
import pytest

from automlprune.cli.main import main
from conftest import assert_drawn


def test_quick_engine_benchmark_writes_a_report(tmp_path, capsys):
    assert main(["benchmark", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cost_model"][0]["exact"] is True
    evaluator, = report["evaluator"]
    assert report["cost_model"][0]["cost_model_us"] > 0 and evaluator["evaluate_s"] > 0 and evaluator["forward_floor_s"] > 0
    assert evaluator["images_per_evaluation"] == 256 + 2 * 64  # the quick settings: 256 validation images, 2 BN batches of 64
    assert [row["target_macs"] for row in report["latency"]] == [0.7, 0.5, 0.3]
    assert all(row["macs_ratio"] <= row["target_macs"] + 1e-9 for row in report["latency"])
    rows = report["latency_table"]["rows"]
    assert rows and all(r["predicted_ms"] > 0 and r["measured_ms"] > 0 for r in rows)
    assert report["latency_table"]["median_abs_error"] == statistics.median(abs(r["predicted_ms"] / r["measured_ms"] - 1) for r in rows)
    text = (tmp_path / "report.md").read_text()
    assert "FlopCounterMode" in text
    assert_drawn(tmp_path / "latency_vs_macs.png")


def test_criteria_benchmark_writes_a_table(tmp_path, capsys, digits_checkpoint):
    checkpoint = digits_checkpoint
    from automlprune.benchmarks.criteria import run_criteria_benchmark

    report = run_criteria_benchmark("digits-cnn", tmp_path / "out", "cpu", targets=(0.5,), finetune_steps=2,
                                    criteria=["l1", "random", "taylor"], overrides=[f"checkpoint={checkpoint}"], progress=False)
    assert [r["criterion"] for r in report["rows"]] == ["l1", "random", "taylor"]
    assert all(r["macs_fraction"] <= 0.5 and 0 <= r["test_accuracy_finetuned"] <= 1 for r in report["rows"])
    assert "| taylor |" in (tmp_path / "out" / "criteria.md").read_text()


def test_signals_benchmark_ranks_signals_against_fine_tuned_accuracy_and_resumes(tmp_path, capsys, digits_checkpoint):
    out = tmp_path / "out"
    args = ["benchmark", "--suite", "signals", "--env", "digits-cnn", "--signals", "l1,prunenet+ls", "--candidates", "2", "--macs", "0.5,0.3",
            "--finetune-steps", "2", "--set", f"checkpoint={digits_checkpoint}", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    report = json.loads((out / "signals.json").read_text())
    rows = report["rows"]
    assert len(rows) == 2 * (3 + 2) * 2  # 2 budgets x (3 allocators + 2 random) x 2 settings
    assert {r["allocation"] for r in rows} == {"uniform", "global", "prunenet", "random-0", "random-1"}
    assert all(r["macs_fraction"] <= r["target"] + 1e-9 and 0 <= r["finetuned_val"] <= 1 for r in rows)
    pick = {(r["target"], r["allocation"]): r["candidate"] for r in rows if r["setting"] == "l1"}
    assert pick == {(r["target"], r["allocation"]): r["candidate"] for r in rows if r["setting"] == "prunenet+ls"}  # same networks
    text = (out / "signals.md").read_text()
    assert "| 50% | prunenet+ls | 5 |" in text and "Spearman" in text
    capsys.readouterr()
    assert main(args) == 0  # everything measured: served from signals.json
    assert "signals 50%" not in capsys.readouterr().out
    assert main(["benchmark", "--suite", "signals", "--finetune-steps", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert main(["benchmark", "--suite", "signals", "--macs", "0.5,1.5"]) == 2
    assert "fractions of the unpruned MACs" in capsys.readouterr().err


@pytest.mark.slow
def test_sparsity_suite_reports_every_arm_and_size(checkpoint, tmp_path, capsys):
    out = tmp_path / "sparsity"
    code = main(["benchmark", "--suite", "sparsity", "--env", "digits-cnn", "--sizes", "0.3", "--arms", "unstructured,2:4,channels",
                 "--evals", "3", "--finetune-epochs", "1", "--set", f"checkpoint={checkpoint}", "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and (out / "report.md").is_file() and (out / "pareto.png").is_file()
    rows = {r["arm"]: r for r in report["rows"]}
    assert "impossible" in rows["2:4"]["unreachable"]  # 2:4 alone keeps more than half the float32 size
    for arm in ("unstructured", "channels"):
        row = rows[arm]
        assert row["bytes_fraction"] <= 0.3 + 1e-9 and row["bytes"] <= row["file_bytes"] <= 1.05 * row["bytes"] + 8192
    assert rows["unstructured"]["macs_fraction"] == 1.0 and rows["unstructured"]["macs_nnz_fraction"] < 0.9  # dense MACs run, fewer are nonzero
    text = (out / "report.md").read_text()
    assert "unreachable: budget bytes=0.3 is impossible" in text and "| unstructured |" in text
    for store in out.glob("*/*/study.db*"):  # on another machine: the committed reports without the run stores
        store.unlink()
    assert main(["benchmark", "--suite", "sparsity", "--env", "digits-cnn", "--sizes", "0.3", "--arms", "unstructured,2:4,channels",
                 "--evals", "3", "--finetune-epochs", "1", "--set", f"checkpoint={checkpoint}", "--out", str(out), "--json"]) == 0
    again = {r["arm"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert again == rows and not list(out.glob("*/*/study.db"))  # the finished arms are kept, not searched again


@pytest.mark.slow
def test_workers_suite_times_one_search_per_worker_count(checkpoint, tmp_path, capsys):
    out = tmp_path / "workers"
    assert main(["benchmark", "--suite", "workers", "--workers", "1,2", "--evals", "6", "--set", f"checkpoint={checkpoint}",
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["workers"] for r in report["rows"]] == [1, 2]
    assert all(r["evaluations"] == r["distinct"] == 6 and r["per_minute"] > 0 and not r["errors"] for r in report["rows"])
    assert (out / "scaling.png").is_file() and "| 2 |" in (out / "report.md").read_text()
