"""The README's learning-results table, rendered from the run records under results/learning/ only.

Runs are grouped by (recipe, model); each cell is the mean over seeds at that step, with the spread (min-max) when
there are several seeds. A second list pairs each model with its own ablation (`X` with `X-none`) seed by seed: at
a given seed both saw the same batches in the same order, so the difference of the pair is the effect of grouping
on that draw, and its sign over the seeds says more than whether the two models' ranges overlap. Step times come
only from the timing records (`timing/*.json`, the models' steps alternated in one process): times of separate
runs on a shared machine are not comparable. The tables replace what lies between the README's two marker lines.
"""

import json
import statistics
from pathlib import Path

BEGIN = "<!-- learning-table:begin (scripts/benchmark_learning.py --render) -->"
END = "<!-- learning-table:end -->"


def load_runs(results: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]


def cell(values: list[float], signed: bool = False) -> str:
    """Mean over seeds, with min-max when there are several; `signed` for differences (+/-, "to" between them)."""
    if not values:
        return ""
    form, between = ("+.1f", " to ") if signed else (".1f", "-")
    mean = statistics.mean(values)
    return f"{mean:{form}}" if len(values) == 1 else f"{mean:{form}} ({min(values):{form}}{between}{max(values):{form}})"


def learning_table(runs: list[dict]) -> str:
    """A markdown table per recipe: model, seeds, parameters, GFLOPs, mIoU at each evaluated step."""
    lines = []
    for recipe in sorted({run["recipe"] for run in runs}):
        in_recipe = [run for run in runs if run["recipe"] == recipe]
        steps = sorted({int(s) for run in in_recipe for s in run["val_miou_by_step"]})
        lines += [f"**{recipe}** (validation mIoU %, at each step; mean over seeds, min-max)", "",
                  "| model | seeds | params (M) | GFLOPs | " + " | ".join(f"@{s}" for s in steps) + " |",
                  "|---|---|---|---|" + "---|" * len(steps)]
        for model in sorted({run["model"] for run in in_recipe}, key=lambda m: (m.split("[")[0], m)):
            group = [run for run in in_recipe if run["model"] == model]
            scores = [cell([run["val_miou_by_step"][str(s)] for run in group if str(s) in run["val_miou_by_step"]])
                      for s in steps]
            lines.append(f"| `{model}` | {','.join(str(run['seed']) for run in group)} | "
                         f"{group[0]['parameters'] / 1e6:.2f} | {group[0]['gflops_at_eval_size']:.2f} | "
                         + " | ".join(scores) + " |")
        lines.append("")
    return "\n".join(lines)


def paired_table(runs: list[dict]) -> str:
    """Per recipe, model minus its ablation (`X` - `X-none`, and `X` - each variant `X-none[...]`) at the same
    seed: mean (min-max) over the seeds both ran, at each step both evaluated, and how many of those seeds the
    model leads at the last of those steps."""
    lines = []
    for recipe in sorted({run["recipe"] for run in runs}):
        by_model = {}
        for run in runs:
            if run["recipe"] == recipe:
                by_model.setdefault(run["model"], {})[run["seed"]] = run["val_miou_by_step"]
        pairs = [(model, ablation) for model in sorted(by_model) for ablation in sorted(by_model)
                 if ablation == f"{model}-none" or ablation.startswith(f"{model}-none[")]
        rows = []
        for model, ablation in pairs:
            seeds = sorted(set(by_model[model]) & set(by_model[ablation]))
            curves = [(by_model[model][seed], by_model[ablation][seed]) for seed in seeds]
            steps = sorted(set.intersection(*(set(a) & set(b) for a, b in curves)), key=int) if curves else []
            if not steps:
                continue
            diffs = {s: [a[s] - b[s] for a, b in curves] for s in steps}
            cells = [f"@{s} {cell(d, signed=True)}" for s, d in diffs.items()]
            ahead = sum(d > 0 for d in diffs[steps[-1]])
            rows.append(f"- `{model}` - `{ablation}`, seeds {','.join(map(str, seeds))}: " + ", ".join(cells)
                        + f"; ahead at {ahead} of {len(seeds)} seeds @{steps[-1]}")
        if rows:
            lines += [f"**{recipe}**, paired by seed (mIoU points, mean (min to max) over seeds):", "", *rows, ""]
    return "\n".join(lines)


def timing_table(records: list[dict]) -> str:
    """Seconds per training step from each timing record, with each model's ratio to the first one listed."""
    lines = []
    for record in records:
        models = list(record["seconds_per_step"])
        first = record["seconds_per_step"][models[0]]
        cells = [f"`{m}` {t:.2f} s (x{t / first:.2f})" for m, t in record["seconds_per_step"].items()]
        lines.append(f"- {record['recipe']}, {record['hardware']['torch_threads']} thread(s), median of "
                     f"{record['steps_timed']} alternated steps: " + ", ".join(cells))
    return "\n".join(lines) + ("\n" if lines else "")


def render_readme_table(results: Path, readme: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN!r} ... {END!r} markers to render the table between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    timings = load_runs(results / "timing") if (results / "timing").is_dir() else []
    runs = load_runs(results)
    table = (learning_table(runs) + "\nGrouping against its own ablation at the same seed:\n\n" + paired_table(runs)
             + "\nStep time (training step, batch and crop of the recipe):\n\n" + timing_table(timings))
    readme.write_text(head + BEGIN + "\n" + table + END + tail)
