"""``python -m vaelab.semisup.report <sweep dir> [<sweep dir> ...]``: test error per method and label budget.

Reads every job of one or more sweeps (``vaelab.train -m model=m2,m1m2 ...`` and
``vaelab.semisup -m ...``), groups the finished ones by method (M1, M2, M1+M2), M1's classifier
and number of labels, and gives the mean and standard deviation (over label seeds and run seeds,
n - 1 in the denominator) of the test error in percent, next to the paper's number (Kingma et al., 2014,
Table 1; M1 is the paper's M1+TSVM). Written as ``semisup_report.md`` and ``semisup_report.csv``
into the first sweep directory (or ``--out``), with ``semisup_curves.png``: the validation error
of every M2 and M1+M2 job per epoch, one panel per number of labels, the paper's test error as a
dashed line (how far training went, and whether it was still falling). The budget sweep presets
end with it (:class:`BudgetReport`).
"""

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vaelab.report import Job, SweepReport, read_sweep

# test error (%) of Kingma et al. (2014), Table 1, by number of labels
PAPER = {
    "M1": {100: 11.82, 600: 5.72, 1000: 4.24, 3000: 3.49},  # M1+TSVM
    "M2": {100: 11.97, 600: 4.94, 1000: 3.60, 3000: 3.92},
    "M1+M2": {100: 3.33, 600: 2.59, 1000: 2.40, 3000: 2.18},
}
METHODS = {"vaelab.semisup.m2.M2": "M2", "vaelab.semisup.m2.M1M2": "M1+M2"}
HEADER = ["method", "classifier", "labels", "runs", "failed", "test error % mean", "std", "min", "max", "paper %",
          "epochs"]


def job_method(job_dir: Path) -> tuple[str, str, int] | None:
    """``(method, classifier, number of labels)`` of a job from its ``.hydra/config.yaml``; None
    for a job that is not semi-supervised. The classifier is M1's (``logistic`` for M1 runs made
    before there was a choice) and empty for M2 and M1+M2 (their own ``q(y|x)``)."""
    cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    method = cfg.get("method") or METHODS.get(OmegaConf.select(cfg, "model._target_"))
    per_class = OmegaConf.select(cfg, "data.labels_per_class")
    if method is None or not isinstance(per_class, int):
        return None
    classifier = OmegaConf.select(cfg, "classifier.name", default="logistic") if cfg.get("method") else ""
    return method, classifier, 10 * per_class


def validation_curve(job_dir: Path) -> list[tuple[int, float]]:
    """``(epochs trained, val/error)`` of a job's training, read from its TensorBoard events: the
    files of its fit (those with training metrics; a resumed run has several), not those of the
    validation and test of the best checkpoint after it. An epoch written twice keeps its first value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for path in sorted(job_dir.glob("tensorboard/**/events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        tags = events.Tags()["scalars"]
        if "val/error" not in tags or not any(tag.startswith("train/") for tag in tags):
            continue
        epoch_at = {event.step: int(event.value) for event in events.Scalars("epoch")}
        for event in events.Scalars("val/error"):
            points.setdefault(epoch_at[event.step] + 1, event.value)
    return sorted(points.items())


def plot_curves(jobs: dict[Path, tuple[str, str, int]], path: Path) -> bool:
    """Validation error (%) per epoch of each job (``job dir -> (method, classifier, labels)``), a
    panel per number of labels, a colour per method, the paper's test error dashed. False if no job
    has a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {job: curve for job in jobs if (curve := validation_curve(job))}
    if not curves:
        return False
    budgets = sorted({jobs[job][-1] for job in curves})
    colors = {method: f"C{i}" for i, method in enumerate(PAPER)}
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.4), squeeze=False)
    for ax, labels in zip(axes[0], budgets, strict=True):
        shown = set()
        for job, curve in curves.items():
            method, _, n = jobs[job]
            if n != labels:
                continue
            epochs, errors = zip(*curve, strict=True)
            ax.plot(epochs, [100 * e for e in errors], color=colors[method], lw=1, alpha=0.8,
                    label=None if method in shown else method)
            if method not in shown and labels in PAPER[method]:
                ax.axhline(PAPER[method][labels], color=colors[method], ls="--", lw=1, label=f"{method}, paper (test)")
            shown.add(method)
        ax.set_title(f"{labels} labels")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation error %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def semisup_jobs(sweep_dirs: list[Path]) -> dict[Path, tuple[Job, tuple[str, str, int]]]:
    """Every semi-supervised job of the sweeps, read once: ``job dir -> (job, (method, classifier, labels))``."""
    return {sweep_dir / job.name: (job, key) for sweep_dir in sweep_dirs for job in read_sweep(sweep_dir)
            if (key := job_method(sweep_dir / job.name)) is not None}


def summarize(sweep_dirs: list[Path]) -> list[list[Any]]:
    """One row per ``(method, classifier, labels)`` (see ``HEADER``), methods in the paper's order."""
    return rows_of(semisup_jobs(sweep_dirs))


def rows_of(jobs: dict[Path, tuple[Job, tuple[str, str, int]]]) -> list[list[Any]]:
    """:func:`summarize`'s rows from jobs already read (:func:`semisup_jobs`)."""
    errors: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    epochs: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    failed: dict[tuple[str, str, int], int] = defaultdict(int)
    for job, key in jobs.values():
        if job.failed or "test/error" not in job.metrics:
            failed[key] += 1
            continue
        errors[key].append(100 * job.metrics["test/error"])
        if "epochs" in job.metrics:
            epochs[key].append(job.metrics["epochs"])
    order = list(PAPER)
    rows = []
    for key in sorted(errors.keys() | failed.keys(), key=lambda k: (order.index(k[0]), k[1], k[2])):
        method, classifier, labels = key
        e = errors[key]
        mean = statistics.fmean(e) if e else math.nan
        std = statistics.stdev(e) if len(e) > 1 else math.nan
        ep = epochs[key]
        rows.append([method, classifier, labels, len(e), failed[key], mean, std, min(e, default=math.nan),
                     max(e, default=math.nan), PAPER[method].get(labels, math.nan),
                     f"{min(ep):g}-{max(ep):g}" if ep and min(ep) != max(ep) else (f"{ep[0]:g}" if ep else "")])
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def markdown(rows: list[list[Any]]) -> str:
    lines = [HEADER, ["---"] * len(HEADER), *rows]
    return "\n".join("| " + " | ".join(_cell(v) for v in line) + " |" for line in lines) + "\n"


def report(sweep_dirs: list[Path], out_dir: Path | None = None) -> str:
    """Write ``semisup_report.md``, ``.csv`` and ``semisup_curves.png`` into ``out_dir`` (default
    the first sweep directory); return the Markdown."""
    jobs = semisup_jobs(sweep_dirs)
    rows = rows_of(jobs)
    if not rows:
        raise FileNotFoundError(f"no semi-supervised jobs (model=m2, model=m1m2 or vaelab.semisup) under "
                                f"{', '.join(map(str, sweep_dirs))}")
    out_dir = out_dir or sweep_dirs[0]
    text = (f"# Test error by method and number of labels\n\nSweeps: {', '.join(map(str, sweep_dirs))}\n"
            "Mean and standard deviation over the finished runs (label seeds x seeds); paper: Kingma et al. "
            "(2014), Table 1 (M1: M1+TSVM).\n\n" + markdown(rows))
    (out_dir / "semisup_report.md").write_text(text)
    with (out_dir / "semisup_report.csv").open("w", newline="") as f:
        csv.writer(f).writerows([HEADER, *rows])
    plot_curves({job_dir: key for job_dir, (_, key) in jobs.items()}, out_dir / "semisup_curves.png")
    return text


class BudgetReport(SweepReport):
    """Hydra callback: the usual sweep report, then :func:`report` of the sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        super().on_multirun_end(config, **kwargs)
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            print(report([sweep_dir]))
        except FileNotFoundError as err:
            print(f"no semi-supervised report: {err}", file=sys.stderr)
            return
        print(f"report: {sweep_dir}/semisup_report.md, semisup_report.csv, semisup_curves.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vaelab.semisup.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="multirun directories (of M1, M2, M1+M2 sweeps)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: the first)")
    args = parser.parse_args(argv)
    for d in args.sweep_dirs:
        if not d.is_dir():
            parser.exit(2, f"error: {d} is not a directory\n")
    try:
        print(report(args.sweep_dirs, args.out), end="")
    except FileNotFoundError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
