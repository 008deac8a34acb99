"""search / compare / plot / export from the command line, and their bad input."""

import csv
import json
import sqlite3
import sys

from conftest import assert_drawn

import pytest

from automlprune.cli.main import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, checkpoint):
    run = tmp_path_factory.mktemp("search") / "run"
    assert main(["search", "digits-cnn", "--strategy", "random", "--budgets", "macs=0.4,0.6", "--evals", "6",
                 "--run-dir", str(run), "--set", f"checkpoint={checkpoint}", "--json"]) == 0
    return run


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _trial_count(run):
    with sqlite3.connect(run / "study.db") as db:
        return db.execute("select count(*) from trials").fetchone()[0]


def test_search_writes_answers_plot_exports_and_config(run_dir):
    answers = json.loads((run_dir / "answers.json").read_text())
    assert [a["budget"] for a in answers] == ["macs=0.4", "macs=0.6"]
    for a in answers:
        limit = float(a["budget"].split("=")[1])
        assert a["answer"]["relative"]["macs"] <= limit and a["evaluations"] <= 6
    assert_drawn(run_dir / "pareto.png")
    assert (run_dir / "model-macs0p4.pt2").is_file() and (run_dir / "model-macs0p6.pt2").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"]["name"] == "digits-cnn" and config["strategies"] == ["random"] and config["versions"]["automlprune"]


def test_rerunning_a_finished_search_evaluates_nothing_new(run_dir, checkpoint, capsys):
    before = _trial_count(run_dir)
    code, out, _ = _run(capsys, "search", "digits-cnn", "--strategy", "random", "--budgets", "macs=0.4,0.6", "--evals", "6",
                        "--run-dir", run_dir, "--set", f"checkpoint={checkpoint}", "--json", "--no-export")
    assert code == 0 and _trial_count(run_dir) == before


def test_plot_and_export(run_dir, capsys, tmp_path):
    from automlprune.search.store import RunStore

    assert 0.9 < RunStore(run_dir, create=False).unpruned_accuracy() <= 1  # the plots' reference point, stored once
    code, out, _ = _run(capsys, "plot", run_dir, "--json")
    assert code == 0 and len(json.loads(out)["plots"]) == 3
    assert_drawn(run_dir / "profiles.png")
    assert_drawn(run_dir / "progress.png")
    code, out, _ = _run(capsys, "export", run_dir, "--budget", "macs=0.4", "--format", "torchscript", "--out", tmp_path / "m.ts", "--json")
    payload = json.loads(out)
    assert code == 0 and (tmp_path / "m.ts").is_file() and payload["answer"]["relative"]["macs"] <= 0.4
    assert payload["max_abs_difference"] < 1e-4  # the file, loaded back, computes what the module does
    assert set(payload["latency_ms"]) == {"module", "exported"} and payload["latency_ms"]["exported"]["1"] > 0


def test_compare_writes_a_report(checkpoint, tmp_path, capsys):
    run = tmp_path / "cmp"
    (tmp_path / "notes.md").write_text("Random fell short because ...\n")
    code, out, _ = _run(capsys, "compare", "digits-cnn", "--strategies", "uniform,random", "--budgets", "macs=0.5",
                        "--evals", "4", "--seeds", "2", "--finetune-epochs", "1", "--run-dir", run,
                        "--set", f"checkpoint={checkpoint}", "--set", "finetune.steps_per_epoch=5",
                        "--notes", tmp_path / "notes.md", "--json")
    assert code == 0
    rows = list(csv.DictReader(open(run / "results.csv")))
    by_strategy = {r["strategy"]: r for r in rows}
    assert by_strategy["random"]["seeds"] == "2" and by_strategy["uniform"]["seeds"] == "1"  # uniform is deterministic
    assert all(float(r["test_accuracy"]) > 0.3 and float(r["macs_fraction"]) <= 0.5 for r in rows)
    import optuna

    unpruned_study = optuna.load_study(study_name="unpruned", storage=f"sqlite:///{run / 'study.db'}")
    unpruned = unpruned_study.user_attrs["latency_ms"]
    from automlprune.search.compare import TIMED

    assert unpruned_study.user_attrs["latency_of"] == TIMED == "deployable, steady allocator"  # as deployed: folded, channels-last
    for r in rows:  # each ratio is the answer's latency over the unpruned network's, measured in the same run
        for b in ("1", "64"):
            assert float(r[f"latency_ms_b{b}"]) > 0
            assert float(r[f"latency_ratio_b{b}"]) == pytest.approx(float(r[f"latency_ms_b{b}"]) / unpruned[b])
        assert float(r["scoring_seconds"]) > 0
    text = (run / "report.md").read_text()
    assert "its ratio to the unpruned network's" in text and "batch norms folded" in text and "channels-last" in text
    assert "| random | macs=0.5 |" in text and "pareto.png" in text
    assert "test accuracy" in text.split("\n")[4] and "trained" in text.split("\n")[4]  # the baseline's epochs and accuracy
    assert "(1 epochs x 5 steps of batch" in text.split("\n")[4]  # the fine-tune, as cut by --set
    assert text.rstrip().endswith("## Notes\n\nRandom fell short because ...")
    best = next(line for line in text.splitlines() if line.startswith("| macs=0.5 |"))
    assert best.split(" | ")[4] == "uniform"  # the best answer's row names its anchor
    for name in ("pareto.png", "progress.png", "profiles.png", "finetuned.png"):
        assert_drawn(run / name)
    assert (run / "results.json").is_file()


def test_answers_that_are_one_network_share_one_fine_tune_with_its_exact_figures(checkpoint, tmp_path, capsys):
    import optuna

    common = ["--budgets", "macs=0.5", "--evals", "1", "--finetune-epochs", "1", "--set", f"checkpoint={checkpoint}",
              "--set", "finetune.steps_per_epoch=5", "--option", "optuna-tpe.warm_start=prunenet", "--json"]
    code, _, _ = _run(capsys, "compare", "digits-cnn", "--strategies", "prunenet,optuna-tpe", "--run-dir", tmp_path / "both", *common)
    assert code == 0
    storage = f"sqlite:///{tmp_path / 'both' / 'study.db'}"
    tuned = {name: optuna.load_study(study_name=name, storage=storage).user_attrs["finetune"]
             for name in ("prunenet|macs=0.5|seed0", "optuna-tpe|macs=0.5|seed0")}
    first, second = tuned["prunenet|macs=0.5|seed0"], tuned["optuna-tpe|macs=0.5|seed0"]
    assert first["candidate"] == second["candidate"]  # TPE's one evaluation was prunenet's answer: the same network
    assert "shared_with" not in second and first["shared_with"] == "optuna-tpe|macs=0.5|seed0"  # the first in report order trains
    code, _, _ = _run(capsys, "compare", "digits-cnn", "--strategies", "optuna-tpe", "--run-dir", tmp_path / "alone", *common)
    alone = optuna.load_study(study_name="optuna-tpe|macs=0.5|seed0",
                              storage=f"sqlite:///{tmp_path / 'alone' / 'study.db'}").user_attrs["finetune"]
    assert code == 0 and "shared_with" not in alone  # trained for itself, it gives exactly the shared figures
    assert (alone["val_accuracy"], alone["test_accuracy"]) == (first["val_accuracy"], first["test_accuracy"])


def test_compare_refuses_a_missing_notes_file_before_running(checkpoint, tmp_path, capsys):
    code, _, err = _run(capsys, "compare", "digits-cnn", "--strategies", "uniform", "--budgets", "macs=0.5",
                        "--run-dir", tmp_path / "cmp", "--set", f"checkpoint={checkpoint}", "--notes", tmp_path / "nope.md")
    assert code == 2 and "cannot read the notes file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cmp" / "study.db").exists()


BAD = {
    "unknown strategy": (["--strategy", "annealing"], "unknown strategy 'annealing'"),
    "malformed budget": (["--budget", "macs:0.5"], "metric=value"),
    "impossible budget": (["--budget", "macs=0.0001"], "impossible"),
    "zero evaluations": (["--evals", "0"], "--evals must be at least 1"),
    "unopenable storage": (["--storage", "sqlite:////nonexistent-dir/sub/x.db"], "cannot open the storage"),
    "bad strategy option": (["--strategy", "greedy", "--option", "probez=3"], "does not take the options"),
    "option of the wrong type": (["--strategy", "greedy", "--option", "probes=abc"], "probes='abc' must be a whole number"),
    "option out of range": (["--strategy", "dmcp", "--option", "search_epochs=-1"], "search_epochs=-1 must be at least 1"),
    "negative seed": (["--seed", "-1"], "--seed -1 is negative"),
    "tolerance for a search strategy": (["--strategy", "random", "--budget", "accuracy_drop=1"], "cannot answer accuracy_drop=1"),
    "malformed tolerance": (["--strategy", "uniform", "--budget", "accuracy_drop=lots"], "needs a number of points"),
    "budget above 1": (["--budget", "macs=1.5"], "is above 1"),
    "negative budget": (["--budget", "macs=-1"], "must be positive"),
    "channel agent on a bits-only space": (["--strategy", "ddpg", "--space", "bits-only", "--budget", "bytes=0.5"],
                                           "has no channel choices"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_search_input_is_one_sentence_exit_2(case, checkpoint, tmp_path, capsys):
    extra, expected = BAD[case]
    code, out, err = _run(capsys, "search", "digits-cnn", "--run-dir", tmp_path / "r", "--evals", "3",
                          "--set", f"checkpoint={checkpoint}", *extra)
    assert code == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # a failed command leaves no empty run directory behind


def test_conflicting_budget_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["search", "digits-cnn", "--budget", "macs=0.5", "--budgets", "macs=0.3,0.5"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_run_dir_of_another_task_is_refused_and_left_untouched(run_dir, checkpoint, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text(f"name: other-task\nmodel: digits_cnn\ndataset: digits\ncheckpoint: {checkpoint}\n")
    before = _trial_count(run_dir)
    code, _, err = _run(capsys, "search", other, "--strategy", "random", "--run-dir", run_dir, "--evals", "3")
    assert code == 2 and 'made with task.name "digits-cnn", not "other-task"' in err
    assert _trial_count(run_dir) == before


def test_export_without_a_feasible_candidate_is_refused(run_dir, capsys):
    code, _, err = _run(capsys, "export", run_dir, "--budget", "macs=0.9")
    assert code == 2 and "no feasible candidate for budget macs=0.9" in err and "macs=0.4" in err
    code, _, err = _run(capsys, "export", run_dir.parent / "nowhere", "--budget", "macs=0.4")
    assert code == 2 and "not a run directory" in err


def test_list_strategies(capsys):
    code, out, _ = _run(capsys, "list", "strategies", "--json")
    assert code == 0 and {"uniform", "random", "greedy", "global", "optuna-tpe", "optuna-nsga2"} <= set(json.loads(out))


def test_prunenet_and_dmcp_compare_and_export(checkpoint, tmp_path, capsys):
    run = tmp_path / "pd"
    code, out, err = _run(capsys, "compare", "digits-cnn", "--strategies", "uniform,prunenet,dmcp", "--budgets", "macs=0.5",
                          "--finetune-epochs", "1", "--run-dir", run, "--set", f"checkpoint={checkpoint}",
                          "--set", "strategies.dmcp.search_epochs=3", "--json")
    assert code == 0, err
    rows = {r["strategy"]: r for r in csv.DictReader(open(run / "results.csv"))}
    assert set(rows) == {"uniform", "prunenet", "dmcp"}
    assert all(float(r["macs_fraction"]) <= 0.5 and float(r["test_accuracy"]) > 0.3 for r in rows.values())
    assert_drawn(run / "prunenet-macs0p5.png")
    assert (run / "dmcp-macs0p5-seed0.json").is_file()
    assert json.loads((run / "dmcp-macs0p5-seed0.json").read_text())["settings"]["search_epochs"] == 3
    code, out, _ = _run(capsys, "export", run, "--budget", "macs=0.5", "--strategy", "prunenet", "--format", "pt",
                        "--out", tmp_path / "p.pt", "--json")
    assert code == 0 and json.loads(out)["strategy"] == "prunenet"


def test_strategy_evaluators(checkpoint, tmp_path):
    import torch

    from automlprune.search.runner import SearchSession
    from automlprune.search.store import RunStore
    from automlprune.tasks import Task, TaskSpec

    spec = TaskSpec.load("digits-cnn", [f"checkpoint={checkpoint}"])
    session = SearchSession(Task(spec), torch.device("cpu"), RunStore(tmp_path / "s"), progress=False)
    assert session.evaluator_for("uniform") is session.evaluator
    prunenet = session.evaluator_for("prunenet")
    assert prunenet is session.evaluator_for("prunenet") and prunenet is not session.evaluator
    assert prunenet.settings.criterion == "prunenet" and prunenet.reconstruction is not None
    assert prunenet.cost_model is session.cost_model
    assert session.evaluator_for("optuna-tpe") is prunenet  # the black-box searches' default signal is prunenet's evaluation


def test_unknown_strategy_option_in_the_task_is_exit_2(checkpoint, tmp_path, capsys):
    code, out, err = _run(capsys, "search", "digits-cnn", "--strategy", "uniform", "--run-dir", tmp_path / "r",
                          "--set", f"checkpoint={checkpoint}", "--set", "strategies.dmcp.epochz=3")
    assert code == 2 and "does not take the options ['epochz']" in err and "Traceback" not in err


def test_compare_with_equal_training_compute(checkpoint, tmp_path, capsys):
    run = tmp_path / "budget"
    code, _, err = _run(capsys, "compare", "digits-cnn", "--strategies", "uniform,greg1", "--budgets", "macs=0.5",
                        "--train-budget", "2", "--run-dir", run, "--set", f"checkpoint={checkpoint}",
                        "--set", "strategies.greg1.max_epochs=1", "--json")
    assert code == 0, err
    from automlprune.data import load_dataset

    budget_images = 2 * len(load_dataset("digits").train)
    rows = {r["strategy"]: r for r in csv.DictReader(open(run / "results.csv"))}
    assert float(rows["uniform"]["training_images"]) == 0 and float(rows["greg1"]["training_images"]) > 0
    for r in rows.values():  # every answer trained on the same images, within a step per fine-tune epoch (3 here)
        total = float(r["training_images"]) + float(r["finetune_images"])
        assert budget_images - 3 * 128 < total <= budget_images
    assert "equal training compute" in (run / "report.md").read_text()
    code, _, err = _run(capsys, "compare", "digits-cnn", "--strategies", "uniform", "--budgets", "macs=0.5",
                        "--train-budget", "2", "--finetune-epochs", "1", "--run-dir", tmp_path / "both",
                        "--set", f"checkpoint={checkpoint}")
    assert code == 2 and "replaces --finetune-epochs" in err


def test_finetune_for_images_spreads_steps_over_passes():
    from automlprune.search.compare import finetune_for_images
    from automlprune.settings import FinetuneSettings

    s = FinetuneSettings(batch_size=100)
    assert finetune_for_images(s, 50, 1000).epochs == 0  # less than a batch left: no fine-tune
    three = finetune_for_images(s, 2500, 1000)  # 25 steps, 10 per pass
    assert three.epochs == 3 and three.steps_per_epoch == 8  # 24 of the 25 steps: never over the budget
    assert finetune_for_images(s, -10, 1000).epochs == 0


def test_a_storage_url_whose_driver_is_missing_names_the_driver(checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("sqlalchemy")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # the driver missing, as on a plain install (the test extra has it)
    code, _, err = _run(capsys, "search", "digits-cnn", "--run-dir", tmp_path / "r", "--evals", "3", "--set", f"checkpoint={checkpoint}",
                        "--storage", "postgresql://user:secret@localhost:1/db")
    assert code == 2 and "needs the database driver 'psycopg'" in err and "automlprune[postgres]" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_compare_under_an_accuracy_tolerance_reports_the_cheapest_answer(checkpoint, tmp_path, capsys):
    run = tmp_path / "tol"
    code, out, _ = _run(capsys, "compare", "digits-cnn", "--strategies", "uniform,prunenet", "--budgets", "accuracy_drop=2,macs=0.5",
                        "--evals", "8", "--finetune-epochs", "0", "--run-dir", run, "--set", f"checkpoint={checkpoint}", "--json")
    assert code == 0
    text = (run / "report.md").read_text()
    table = text.split("Cheapest answer per accuracy tolerance")[1].split("\n\n")[1]
    row = next(line for line in table.splitlines() if line.startswith("| accuracy_drop=2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    rows = {(r["strategy"], r["budget"]): r for r in csv.DictReader(open(run / "results.csv"))}
    cheapest = min(("uniform", "prunenet"), key=lambda s: float(rows[(s, "accuracy_drop=2")]["macs_fraction"]))
    assert cells[2] == cheapest and cells[6] == "uniform"  # the cheapest strategy and the cheapest anchor
    floor = float(cells[1])
    assert all(float(rows[(s, "accuracy_drop=2")]["val_accuracy"]) * 100 >= floor - 1e-6 for s in ("uniform", "prunenet"))
    assert "| uniform | accuracy_drop=2 |" in text and "| macs=0.5 |" in text
    assert_drawn(run / "pareto.png")
