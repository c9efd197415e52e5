"""``python -m vaelab.report <multirun dir>``: a sweep's jobs in one table, best first.

A job is a directory holding ``.hydra/overrides.yaml`` (anywhere under the sweep directory). Its
row has the values of the swept parameters (the overrides that differ between jobs), every number
of its ``metrics.json``, and, for a failed job, the first line of its ``error.txt`` (or why it
has no ``metrics.json``). The table is printed as Markdown and written, with a plot of the metric
against each swept parameter, as ``report.md``, ``report.csv`` and ``report.png`` into the sweep
directory. Every sweep (``vaelab.train -m``) ends with this report (:class:`SweepReport`).
"""

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

NO_METRICS = "no metrics.json (the job was killed, or is still running)"


@dataclass
class Job:
    name: str  # the job's directory, relative to the sweep directory
    overrides: dict[str, str]  # key -> value as given on the command line
    metrics: dict[str, float]  # the numbers of metrics.json
    error: str | None  # None for a finished job

    @property
    def failed(self) -> bool:
        return self.error is not None


def _override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def read_job(job_dir: Path, sweep_dir: Path) -> Job:
    """A job's overrides, metrics and error line."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    metrics_file, error_file = job_dir / "metrics.json", job_dir / "error.txt"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    error = None
    if error_file.is_file():
        error = (error_file.read_text().strip().splitlines() or ["error.txt is empty"])[0]
    elif not metrics_file.is_file():
        error = NO_METRICS
    name = job_dir.relative_to(sweep_dir).as_posix()
    return Job(name, dict(_override(o) for o in overrides), numbers, error)


def _job_order(job: Job) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in job.name.split("/")]


def read_sweep(sweep_dir: Path) -> list[Job]:
    """Every job under ``sweep_dir``, in job-number order."""
    job_dirs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    return sorted((read_job(d, sweep_dir) for d in job_dirs), key=_job_order)


def swept_keys(jobs: list[Job]) -> list[str]:
    """The override keys whose values differ between jobs, in command-line order."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def common_overrides(jobs: list[Job]) -> list[str]:
    """The overrides every job shares (``key=value``)."""
    swept = set(swept_keys(jobs))
    return [f"{k}={v}" for k, v in jobs[0].overrides.items() if k not in swept] if jobs else []


def sort_jobs(jobs: list[Job], metric: str, maximize: bool = False) -> list[Job]:
    """Finished jobs by ``metric`` (best first; those without it after them), then failed jobs."""

    def key(job: Job) -> tuple[int, float]:
        value = job.metrics.get(metric, math.nan)
        if job.failed:
            return 2, 0.0
        if math.isnan(value):
            return 1, 0.0
        return 0, -value if maximize else value

    return sorted(jobs, key=key)


def table(jobs: list[Job], metric: str) -> tuple[list[str], list[list[Any]]]:
    """``(header, rows)``: job, status, swept parameters, ``metric``, the other numbers, error."""
    swept = swept_keys(jobs)
    stages = {"val": 0, "test": 1}
    others = sorted({k for job in jobs for k in job.metrics} - {metric},
                    key=lambda k: (stages.get(k.split("/")[0], 2), k))
    header = ["job", "status", *swept, metric, *others, "error"]
    rows = [
        [job.name, "failed" if job.failed else "ok", *(job.overrides.get(k, "") for k in swept),
         *(job.metrics.get(k, "") for k in (metric, *others)), job.error or ""]
        for job in jobs
    ]
    return header, rows


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(_cell(v) for v in line) + " |" for line in lines) + "\n"


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([repr(v) if isinstance(v, float) else v for v in row] for row in rows)


def _as_number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def plot(path: Path, jobs: list[Job], metric: str) -> bool:
    """``metric`` of the finished jobs against each swept parameter, one panel per parameter, with
    the mean over the other parameters as a line. False (nothing drawn) without swept
    parameters or finished jobs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = swept_keys(jobs)
    done = [job for job in jobs if not job.failed and math.isfinite(job.metrics.get(metric, math.nan))]
    if not swept or not done:
        return False
    fig, axes = plt.subplots(1, len(swept), figsize=(3.2 * len(swept) + 0.8, 3.2), squeeze=False)
    for ax, key in zip(axes[0], swept, strict=True):
        values = sorted({job.overrides.get(key, "") for job in done},
                        key=lambda v: (_as_number(v) is None, _as_number(v) or 0.0, v))
        position = {v: i for i, v in enumerate(values)}
        xs = [position[job.overrides.get(key, "")] for job in done]
        ys = [job.metrics[metric] for job in done]
        ax.scatter(xs, ys, s=18, alpha=0.6, label="job")
        means = [sum(y for x, y in zip(xs, ys, strict=True) if x == i) / xs.count(i) for i in range(len(values))]
        ax.plot(range(len(values)), means, "o-", color="black", lw=1, ms=3, label="mean")
        ax.set_xticks(range(len(values)), values, rotation=30 if len(values) > 4 else 0)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    failed = len(jobs) - len(done)
    fig.suptitle(f"{metric}: {len(done)} jobs" + (f", {failed} failed or without it" if failed else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(sweep_dir: Path, metric: str = "val/loss", maximize: bool = False) -> str:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``sweep_dir``; return the
    Markdown."""
    jobs = sort_jobs(read_sweep(sweep_dir), metric, maximize)
    if not jobs:
        raise FileNotFoundError(f"no job directories (with .hydra/overrides.yaml) under {sweep_dir}")
    header, rows = table(jobs, metric)
    failed = sum(job.failed for job in jobs)
    common = " ".join(common_overrides(jobs)) or "none"
    order = "highest" if maximize else "lowest"
    text = (
        f"# Sweep {sweep_dir}\n\n{len(jobs)} jobs, {failed} failed; sorted by {metric}, {order} first.\n"
        f"Common overrides: {common}\n\n{markdown(header, rows)}"
    )
    (sweep_dir / "report.md").write_text(text)
    write_csv(sweep_dir / "report.csv", header, rows)
    plot(sweep_dir / "report.png", jobs, metric)
    return text


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks``): after a sweep, print its report and write it into
    the sweep directory, sorted by ``optimized_metric`` in the sweeper's direction."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        metric = config.get("optimized_metric") or "val/loss"
        maximize = OmegaConf.select(config, "hydra.sweeper.direction", default=None) == "maximize"
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            print(report(sweep_dir, metric, maximize))
        except FileNotFoundError as err:  # e.g. every job of the sweep was refused before it began
            print(f"no sweep report: {err}", file=sys.stderr)
            return
        print(f"report: {sweep_dir}/report.md, report.csv, report.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vaelab.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. outputs/multirun/<date>_<time>")
    parser.add_argument("--metric", default="val/loss", help="the key of metrics.json to sort by (default val/loss)")
    parser.add_argument("--maximize", action="store_true", help="highest first (e.g. for val/elbo)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.exit(2, f"error: {args.sweep_dir} is not a directory\n")
    try:
        print(report(args.sweep_dir, args.metric, args.maximize), end="")
    except FileNotFoundError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"\nwritten: {args.sweep_dir}/report.md, report.csv, report.png")


if __name__ == "__main__":
    main()
