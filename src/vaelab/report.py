"""``python -m vaelab.report <multirun dir> [--evaluate [--iw-samples K]]``: a sweep's jobs in one
table, best first.

A job is a directory holding ``.hydra/overrides.yaml`` (anywhere under the sweep directory). Its
row has the values of the swept parameters (the overrides that differ between jobs), every number
of its ``metrics.json``, its ``seconds_per_epoch`` (``timing.json``, written by
:class:`vaelab.callbacks.timing.EpochTimer`), and, for a failed job, the first line of its
``error.txt`` (or why it has no ``metrics.json``). The table is printed as Markdown and written,
with a plot of the metric against each swept parameter, as ``report.md``, ``report.csv`` and
``report.png`` into the sweep directory. Every sweep (``vaelab.train -m``) ends with this report
(:class:`SweepReport`).

``--evaluate`` adds the results table (docs/results.md): each finished job's best checkpoint is
evaluated on the test split by :func:`vaelab.evaluate.evaluate` (importance-weighted NLL with K
samples, the K-sample ELBO, active units), which writes ``evaluation.json`` into the job's
directory; a job whose ``evaluation.json`` already holds that checkpoint at that K is not
evaluated again.
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

from vaelab import config_dir

NO_METRICS = "no metrics.json (the job was killed, or is still running)"
EVALUATION, TIMING = "evaluation.json", "timing.json"


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
    timing_file = job_dir / TIMING
    if timing_file.is_file():
        numbers["seconds_per_epoch"] = float(json.loads(timing_file.read_text())["seconds_per_epoch"])
    error = None
    if error_file.is_file():
        error = (error_file.read_text().strip().splitlines() or ["error.txt is empty"])[0]
    elif not metrics_file.is_file():
        error = NO_METRICS
    name = job_dir.relative_to(sweep_dir).as_posix()
    return Job(name, dict(_override(o) for o in overrides), numbers, error)


def _job_order(job: Job) -> list[tuple[int, Any]]:
    """Numbered jobs by number, then runs with other names (gathered beside them) by name."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in job.name.split("/")]


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


def has_value(job: Job, metric: str) -> bool:
    """Whether ``job`` finished with a finite value of ``metric``."""
    return not job.failed and math.isfinite(job.metrics.get(metric, math.nan))


def plot_title(jobs: list[Job], metric: str) -> str:
    """``metric``, the number of jobs with a value of it, and of the others: failed, or finished
    without that metric (in a results sweep, MADE has no ``val/elbo``)."""
    failed = sum(job.failed for job in jobs)
    done = sum(has_value(job, metric) for job in jobs)
    without = len(jobs) - done - failed
    return f"{metric}: {done} jobs" + f", {failed} failed" * bool(failed) + f", {without} without it" * bool(without)


def plot(path: Path, jobs: list[Job], metric: str) -> bool:
    """``metric`` of the finished jobs against each swept parameter, one panel per parameter, with
    the mean over the other parameters as a line. False (nothing drawn) without swept
    parameters or finished jobs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = swept_keys(jobs)
    done = [job for job in jobs if has_value(job, metric)]
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
    fig.suptitle(plot_title(jobs, metric))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def higher_is_better(metric: str) -> bool:
    """The default direction of a metric: up for an ELBO (``val/elbo``), down for anything else."""
    return metric.rsplit("/", 1)[-1] == "elbo"


def best_checkpoint(job_dir: Path) -> Path:
    """The checkpoint ``metrics.json`` names as best, found in the job's ``checkpoints/`` when the
    sweep directory has moved since training; ``FileNotFoundError`` if there is none."""
    name = json.loads((job_dir / "metrics.json").read_text()).get("best_checkpoint")
    if not name:
        raise FileNotFoundError("no best checkpoint recorded in metrics.json")
    for path in (Path(name), job_dir / "checkpoints" / Path(name).name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"best checkpoint {name} not found")


def evaluate_job(job_dir: Path, iw_samples: int, data_root: str | None = None) -> dict[str, Any]:
    """The test-split evaluation of the job's best checkpoint with ``iw_samples`` importance
    samples: its ``evaluation.json`` when that holds this checkpoint at this K, else a new one
    (announced on stderr: at K = 5000 it takes minutes on a CPU)."""
    from vaelab.evaluate import evaluate  # torch and the models: only when evaluating

    ckpt = best_checkpoint(job_dir)
    cached = job_dir / EVALUATION
    if cached.is_file():
        results = json.loads(cached.read_text())
        key = (results.get("split"), results.get("iw_samples"), Path(results.get("ckpt_path", "")).name)
        if key == ("test", iw_samples, ckpt.name):
            return results
    print(f"evaluating {job_dir}: {ckpt.name}, test split, K={iw_samples}", file=sys.stderr)
    cfg = OmegaConf.load(config_dir() / "evaluate.yaml")  # the CLI's defaults, without Hydra's own keys
    cfg.pop("defaults"), cfg.pop("hydra")
    overrides = {"ckpt_path": str(ckpt), "iw_samples": iw_samples, "split": "test", "out_dir": str(job_dir)}
    if data_root is not None:
        overrides["data"] = {"root": data_root}
    return evaluate(OmegaConf.merge(cfg, overrides))


def row_label(job: Job, swept: list[str]) -> str:
    """A row's name: the value of the one swept parameter (``mlp_vae``), else the ``key=value``
    pairs of the swept keys the job was given, else the job's directory."""
    if len(swept) == 1 and swept[0] in job.overrides:
        return job.overrides[swept[0]]
    return " ".join(f"{k}={job.overrides[k]}" for k in swept if k in job.overrides) or job.name


def evaluate_jobs(
    sweep_dir: Path, jobs: list[Job], iw_samples: int, data_root: str | None = None
) -> dict[str, dict[str, Any] | str]:
    """job name -> :func:`evaluate_job`'s results, or the line saying why there are none (a failed
    job's error, or the evaluation's own); one job's failure does not stop the others."""
    evaluations: dict[str, dict[str, Any] | str] = {}
    for job in jobs:
        if job.failed:
            evaluations[job.name] = job.error or ""
            continue
        try:
            evaluations[job.name] = evaluate_job(sweep_dir / job.name, iw_samples, data_root)
        except Exception as err:  # any cause (no checkpoint, a model it cannot evaluate): the row says it
            evaluations[job.name] = f"{type(err).__name__}: {err}".splitlines()[0]
    return evaluations


def results_table(
    jobs: list[Job], evaluations: dict[str, dict[str, Any] | str], iw_samples: int
) -> tuple[list[str], list[list[Any]]]:
    """``(header, rows)`` of the results table, lowest NLL first: per job its :func:`row_label`,
    epochs trained, the epoch of its best checkpoint, test ELBO and NLL in nats, active units,
    seconds per epoch, and a note for a job without an evaluation (why not)."""
    swept = swept_keys(jobs)
    results = {job.name: evaluations.get(job.name, "not evaluated") for job in jobs}

    def nll(job: Job) -> float:
        value = results[job.name].get("test/nll") if isinstance(results[job.name], dict) else None
        return value if isinstance(value, int | float) else math.inf

    def nats(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, int | float) else ""

    rows = []
    for job in sorted(jobs, key=nll):
        done = results[job.name] if isinstance(results[job.name], dict) else {}
        seconds = job.metrics.get("seconds_per_epoch")
        rows.append([
            row_label(job, swept),
            int(job.metrics["epochs"]) if "epochs" in job.metrics else "",
            done.get("epochs", ""),
            nats(done.get("test/elbo")),
            nats(done.get("test/nll")),
            done.get("test/active_units", ""),
            f"{seconds:.1f}" if seconds is not None else "",
            "" if done else f"failed: {results[job.name]}",
        ])
    header = ["model", "epochs", "best epoch", "test ELBO", f"test NLL (K={iw_samples})", "active units",
              "s/epoch", "note"]
    if not any(row[-1] for row in rows):
        header, rows = header[:-1], [row[:-1] for row in rows]
    return header, rows


def report(
    sweep_dir: Path,
    metric: str = "val/elbo",
    maximize: bool | None = None,
    iw_samples: int | None = None,
    data_root: str | None = None,
) -> str:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``sweep_dir``; return the
    Markdown. ``maximize`` None: :func:`higher_is_better`. With ``iw_samples``, evaluate every
    finished job's best checkpoint (:func:`evaluate_job`, ``data_root`` overriding the data
    root it was trained with) and add the results table."""
    maximize = higher_is_better(metric) if maximize is None else maximize
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
    if iw_samples is not None:
        evaluations = evaluate_jobs(sweep_dir, jobs, iw_samples, data_root)
        text += (
            f"\n## Results: test split, each job's best checkpoint, NLL importance-weighted with K={iw_samples}\n\n"
            f"{markdown(*results_table(jobs, evaluations, iw_samples))}"
        )
    (sweep_dir / "report.md").write_text(text)
    write_csv(sweep_dir / "report.csv", header, rows)
    plot(sweep_dir / "report.png", jobs, metric)
    return text


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks``): after a sweep, print its report and write it into
    the sweep directory, sorted by ``optimized_metric`` in ``optimized_direction``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        metric = config.get("optimized_metric") or "val/elbo"
        direction = config.get("optimized_direction")
        maximize = direction == "maximize" if direction else None
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
    parser.add_argument("--metric", default="val/elbo", help="the key of metrics.json to sort by (default val/elbo)")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--maximize", action="store_true", default=None,
                           help="highest first (the default for an ELBO)")
    direction.add_argument("--minimize", dest="maximize", action="store_false", help="lowest first")
    parser.add_argument("--evaluate", action="store_true",
                        help="evaluate each job's best checkpoint on the test split and add the results table "
                             "(cached in the job's evaluation.json)")
    parser.add_argument("--iw-samples", type=int, default=None, metavar="K",
                        help="importance samples per test image for --evaluate (default: vaelab.evaluate's, 5000)")
    parser.add_argument("--data-root", default=None,
                        help="for --evaluate: the data root, if not where the jobs were trained")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.exit(2, f"error: {args.sweep_dir} is not a directory\n")
    if args.iw_samples is not None and not args.evaluate:
        parser.exit(2, "error: --iw-samples is for --evaluate; add --evaluate\n")
    if args.iw_samples is not None and args.iw_samples < 1:
        parser.exit(2, f"error: --iw-samples must be a positive integer, got {args.iw_samples}\n")
    iw_samples = None
    if args.evaluate:
        iw_samples = args.iw_samples or OmegaConf.load(config_dir() / "evaluate.yaml").iw_samples
    try:
        print(report(args.sweep_dir, args.metric, args.maximize, iw_samples, args.data_root), end="")
    except FileNotFoundError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"\nwritten: {args.sweep_dir}/report.md, report.csv, report.png")


if __name__ == "__main__":
    main()
