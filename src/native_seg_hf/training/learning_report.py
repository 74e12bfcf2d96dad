"""The README's learning-results table, rendered from the run records under results/learning/ only.

Runs are grouped by (recipe, model); each cell is the mean over seeds at that step, with the spread (min-max) when
there are several seeds. The table replaces what lies between the README's two marker lines.
"""

import json
import statistics
from pathlib import Path

BEGIN = "<!-- learning-table:begin (scripts/benchmark_learning.py --render) -->"
END = "<!-- learning-table:end -->"


def load_runs(results: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]


def cell(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.mean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ({min(values):.1f}-{max(values):.1f})"


def learning_table(runs: list[dict]) -> str:
    """A markdown table per recipe: model, seeds, parameters, GFLOPs, s/step, mIoU at each evaluated step."""
    lines = []
    for recipe in sorted({run["recipe"] for run in runs}):
        in_recipe = [run for run in runs if run["recipe"] == recipe]
        steps = sorted({int(s) for run in in_recipe for s in run["val_miou_by_step"]})
        lines += [f"**{recipe}** (mIoU %, CamVid validation, 101 images at 480x360; mean over seeds, min-max)", "",
                  "| model | seeds | params (M) | GFLOPs | s/step | " + " | ".join(f"@{s}" for s in steps) + " |",
                  "|---|---|---|---|---|" + "---|" * len(steps)]
        for model in sorted({run["model"] for run in in_recipe}, key=lambda m: (m.split("[")[0], m)):
            group = [run for run in in_recipe if run["model"] == model]
            scores = [cell([run["val_miou_by_step"][str(s)] for run in group if str(s) in run["val_miou_by_step"]])
                      for s in steps]
            lines.append(f"| `{model}` | {','.join(str(run['seed']) for run in group)} | "
                         f"{group[0]['parameters'] / 1e6:.2f} | {group[0]['gflops_at_eval_size']:.2f} | "
                         f"{statistics.mean(run['seconds_per_step'] for run in group):.2f} | " + " | ".join(scores) + " |")
        lines.append("")
    return "\n".join(lines)


def render_readme_table(results: Path, readme: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN!r} ... {END!r} markers to render the table between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + learning_table(load_runs(results)) + END + tail)
