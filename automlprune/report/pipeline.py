"""A pipeline's report: one row per stage (its search, its answer's costs and accuracy before and
after its fine-tune), the path the stages take through the (cost, accuracy) plane, and the
final network exported (packed with its bits and sparsity), its file size beside the reported
bytes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import matplotlib

from automlprune.report.plots import figure
from automlprune.search.pipeline import PipelineOutcome
from automlprune.search.runner import SearchSession

COST_COLUMNS = ("macs", "params", "bytes", "bitops")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def write_pipeline_report(session: SearchSession, outcome: PipelineOutcome, run_dir: Path, export: bool = True) -> dict[str, Any]:
    """Write ``pipeline-<name>-<final budget>-seed<s>.md`` / ``.json`` / ``.png`` (and, with
    ``export``, the final network as ``.pt2`` and, when quantized or sparse, packed ``.qpt``)
    into ``run_dir``; returns the JSON payload."""
    final = outcome.final
    slug = f"pipeline-{outcome.pipeline.name}-{final.budget.replace('=', '').replace('.', 'p')}-seed{outcome.seed}"
    payload: dict[str, Any] = {"pipeline": outcome.pipeline.to_dict(), "seed": outcome.seed,
                               "unpruned_val_accuracy": outcome.unpruned_val_accuracy,
                               "stages": [vars(s) for s in outcome.stages]}
    if export:
        payload["export"] = _export(session, outcome, run_dir, slug)
    payload["plot"] = str(plot_pipeline_path(session, outcome, run_dir / f"{slug}.png"))
    (run_dir / f"{slug}.json").write_text(json.dumps(payload, indent=1, default=str))
    (run_dir / f"{slug}.md").write_text(_markdown(outcome, payload))
    payload["report"] = str(run_dir / f"{slug}.md")
    return payload


def _export(session: SearchSession, outcome: PipelineOutcome, run_dir: Path, slug: str) -> dict[str, Any]:
    from automlprune.export import export_model
    from automlprune.quantization import RECORD_ATTRIBUTE
    from automlprune.sparsity.masks import sparsity_record

    network = copy.deepcopy(outcome.network).cpu().eval()  # the outcome's network stays where it is
    example = session.task.data.example_input()
    out: dict[str, Any] = {"pt2": str(export_model(network, example, run_dir / f"{slug}.pt2"))}
    if sparsity_record(network) or getattr(network, RECORD_ATTRIBUTE, None):
        packed = export_model(network, example, run_dir / f"{slug}.qpt", architecture=session.task.architecture())
        out.update(packed=str(packed), file_bytes=packed.stat().st_size)
    out["reported_bytes"] = float(outcome.final.answer["bytes"])
    return out


def _markdown(outcome: PipelineOutcome, payload: dict[str, Any]) -> str:
    pipeline, final = outcome.pipeline, outcome.final
    lines = [f"# Pipeline {pipeline.name} (seed {outcome.seed})", ""]
    if pipeline.description:
        lines += [pipeline.description, ""]
    lines += [f"Unpruned network: {_pct(outcome.unpruned_val_accuracy)} validation accuracy. Costs are fractions of the unpruned "
              "network's (bytes: its float32 size); accuracies are validation accuracies except the last column.", "",
              "| stage | strategy | budget | input | evaluations | search s | training images | answer val | fine-tune | after val | after test | "
              + " | ".join(COST_COLUMNS) + " |",
              "|" + "---|" * (11 + len(COST_COLUMNS))]
    for s in outcome.stages:
        relative = s.answer["relative"]
        metric = s.budget.split("=")[0]
        tuned = f"{s.finetune['epochs']} epochs" if s.finetune else "none"
        lines.append(f"| {s.index}. {s.name} | {s.strategy} | {s.budget} | {_pct(s.input[metric])} {metric} | {s.evaluations} | "
                     f"{s.seconds:.0f} | {s.training_images:,.0f} | {_pct(s.answer['accuracy'])} | {tuned} | {_pct(s.val_accuracy)} | "
                     f"{_pct(s.test_accuracy)} | " + " | ".join(_pct(relative[m]) for m in COST_COLUMNS) + " |")
    lines += ["", f"**Final network**: {_pct(final.test_accuracy)} test accuracy, {_pct(final.answer['relative']['bytes'])} of the "
              f"unpruned bytes ({final.answer['bytes'] / 1024:.1f} KiB of parameters), {_pct(final.answer['relative']['macs'])} of its MACs."]
    export = payload.get("export") or {}
    if "packed" in export:
        lines.append(f"Packed export `{Path(export['packed']).name}`: {export['file_bytes']:,} bytes on disk for {export['reported_bytes']:,.0f} "
                     "reported bytes of parameters (the rest: batch-norm statistics and metadata).")
    if "pt2" in export:
        lines.append(f"Dense export (torch.export): `{Path(export['pt2']).name}`.")
    lines += ["", f"![path through the (cost, accuracy) plane]({Path(payload['plot']).name})", ""]
    return "\n".join(lines)


def plot_pipeline_path(session: SearchSession, outcome: PipelineOutcome, path: Path) -> Path:
    """One panel per budget metric of the pipeline: every stage's evaluations (faint, its colour),
    its answer (ringed) and its fine-tuned network (filled), joined in order from the unpruned
    network (star): the path the stages take through the (cost, accuracy) plane; a stage's budget
    is a dashed line in its colour."""
    import optuna

    metrics = list(dict.fromkeys(s.budget.split("=")[0] for s in outcome.stages))
    fig, axes = figure(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    cmap = matplotlib.colormaps["tab10"]
    for ax, metric in zip(axes[0], metrics):
        path_x, path_y = [1.0], [100 * outcome.unpruned_val_accuracy]
        ax.scatter(path_x, path_y, marker="*", s=160, color="black", zorder=5, label="unpruned")
        for i, stage in enumerate(outcome.stages):
            color = cmap(i % cmap.N)
            study = optuna.load_study(study_name=stage.study_name, storage=session.store.storage)
            points = [r.result for r in session.store.records(study) if r.result.full]
            ax.scatter([p.relative[metric] for p in points], [100 * p.accuracy for p in points], s=10, alpha=0.25, color=color)
            x = stage.answer["relative"][metric]
            ax.scatter([x], [100 * stage.answer["accuracy"]], s=70, facecolors="none", edgecolors=[color], linewidths=1.5)
            ax.scatter([x], [100 * stage.val_accuracy], s=50, color=color, zorder=4,
                       label=f"{stage.index}. {stage.name} ({stage.strategy}, {stage.budget})")
            if stage.budget.split("=")[0] == metric:
                ax.axvline(stage.budget_fraction, linestyle="--", color=color, alpha=0.5, linewidth=1)
            path_x += [x, x]
            path_y += [100 * stage.answer["accuracy"], 100 * stage.val_accuracy]
        ax.plot(path_x, path_y, color="grey", linewidth=1, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel(f"{metric} (fraction of the unpruned network, log scale)")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"pipeline {outcome.pipeline.name}: ringed = stage answer, filled = after its fine-tune")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
