"""report.html: one self-contained page per run (opt, hyp, metric tables, curves, pictures), built from the
files in the run folder alone, so it can be regenerated for any finished run:

    python -m utils.viz.report runs/train/exp

Images are linked relatively (the page is opened straight from disk, no server) and only files that exist
are linked, so a run trained with fewer tasks gets a shorter page, not broken images.
"""
from __future__ import annotations

import argparse
import html
import math
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from utils.tasks import ALL_TASKS, fitness, is_metric_key, task_of_key
from utils.viz.plots import read_results

TASK_TITLES = {"det": "Detection (boxes)", "inst": "Instance segmentation (masks)",
               "sem": "Semantic segmentation", "cap": "Captioning"}
# sections of pictures, in page order: (heading, [(file, caption)])
FIGURES: list[tuple[str, list[tuple[str, str]]]] = [
    ("Training curves", [("results.png", "losses and metrics per task over epochs")]),
    ("Labels", [("labels.jpg", "training label statistics")]
     + [(f"train_batch{i}.jpg", f"augmented training batch {i}, every task drawn") for i in range(3)]),
    ("Detection and masks", [("PR_curve.png", "box precision-recall"), ("F1_curve.png", "box F1-confidence"),
                             ("mask_PR_curve.png", "mask precision-recall"), ("mask_F1_curve.png", "mask F1-confidence"),
                             ("confusion_matrix.png", "detection confusion matrix (IoU 0.45, conf 0.25)")]),
    ("Semantic segmentation", [("semantic_confusion_matrix.png", "semantic confusion matrix (pixels)")]),
]


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: Sequence[Sequence[object]], header: Sequence[str], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}


def best_row(rows: list[dict[str, float]]) -> int:
    """Index of the row ``best.pt`` was saved from: the first maximum of the trainer's multi-task fitness."""
    scores = [fitness({k: v for k, v in r.items() if not math.isnan(v)}) for r in rows]
    return max(range(len(rows)), key=lambda i: (scores[i], -i)) if rows else -1


def metric_tables(rows: list[dict[str, float]], tasks: Sequence[str]) -> dict[str, list[tuple[str, float, float]]]:
    """Per task: ``(key, final value, value at the best epoch)`` for its metrics first, then its val and
    train losses."""
    if not rows:
        return {}
    final, best = rows[-1], rows[best_row(rows)]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for t in tasks:
        mine = [k for k in keys if task_of_key(k) == t and not k.startswith("weight/")]
        order = [k for k in mine if is_metric_key(k)] + [k for k in mine if k.startswith("val/")] + \
                [k for k in mine if k.startswith("train/")] + [k for k in keys if k == f"weight/{t}"]
        out[t] = [(k, final.get(k, math.nan), best.get(k, math.nan)) for k in order]
    return out


def write_report(save_dir: Path, tasks: Sequence[str] | None = None,
                 captions: Sequence[tuple[int, str, list[str]]] = (), notes: Sequence[str] = ()) -> Path:
    """Writes ``save_dir/report.html`` from ``opt.yaml``, ``hyp.yaml``, ``results.csv`` and the pictures there.

    Args:
        tasks: the model's tasks (default: those with columns in results.csv).
        captions: a few ``(image id, predicted, references)`` validation captions to list.
        notes: extra lines for the header (e.g. plotting timings).
    """
    save_dir = Path(save_dir)
    opt, hyp = _read_yaml(save_dir / "opt.yaml"), _read_yaml(save_dir / "hyp.yaml")
    csv_path = save_dir / "results.csv"
    rows = read_results(csv_path) if csv_path.is_file() else []
    if tasks is None:
        tasks = [t for t in ALL_TASKS if any(task_of_key(k) == t for r in rows for k in r)]
    parts = [f"<h1>{html.escape(save_dir.name)}</h1>",
             f'<p class="meta">{html.escape(str(save_dir.resolve()))} &middot; written '
             f'{time.strftime("%Y-%m-%d %H:%M:%S")} &middot; tasks {html.escape(", ".join(tasks))}</p>']
    if rows:
        b = best_row(rows)
        parts.append(f"<p>{len(rows)} epochs logged; final epoch {int(rows[-1].get('epoch', len(rows)))}, best epoch "
                     f"{int(rows[b].get('epoch', b + 1))} (multi-task fitness, the epoch of <code>best.pt</code>).</p>")
    links = [(f, f) for f in ("weights/best.pt", "weights/last.pt", "results.csv", "opt.yaml", "hyp.yaml")
             if (save_dir / f).is_file()]
    if links:
        parts.append("<p>" + " &middot; ".join(f'<a href="{html.escape(h)}">{html.escape(t)}</a>' for h, t in links) + "</p>")
    parts += [f"<p class='meta'>{html.escape(n)}</p>" for n in notes]
    # metrics
    parts.append("<h2>Metrics</h2>")
    tables = metric_tables(rows, tasks)
    if not tables:
        parts.append("<p>no results.csv</p>")
    parts.append('<div class="grid">')
    for t, entries in tables.items():
        parts.append(f"<section><h3>{html.escape(TASK_TITLES.get(t, t))}</h3>"
                     + _table(entries, ["key", "final", "best epoch"], "metrics") + "</section>")
    parts.append("</div>")
    # pictures
    for heading, files in FIGURES:
        present = [(f, c) for f, c in files if (save_dir / f).is_file()]
        if present:
            parts.append(f"<h2>{html.escape(heading)}</h2><div class='figs'>"
                         + "".join(_figure(f, c) for f, c in present) + "</div>")
    val = [(f"val_batch{i}_labels.jpg", f"val_batch{i}_pred.jpg") for i in range(3)]
    val = [(a, b) for a, b in val if (save_dir / a).is_file() or (save_dir / b).is_file()]
    if val:
        parts.append("<h2>Validation pictures</h2><p>Left: labels. Right: predictions of the final EMA model.</p>")
        for a, b in val:
            parts.append("<div class='pair'>" + "".join(_figure(f, f) for f in (a, b) if (save_dir / f).is_file())
                         + "</div>")
    if captions:
        parts.append("<h2>Validation captions</h2>")
        parts.append(_table([(i, p, " | ".join(r[:2])) for i, p, r in captions],
                            ["image", "predicted", "references (first two)"]))
    # configuration
    parts.append("<h2>Configuration</h2><div class='grid'>")
    parts.append("<section><h3>opt</h3>" + _table(list(opt.items()), ["option", "value"]) + "</section>")
    parts.append("<section><h3>hyp</h3>" + _table(list(hyp.items()), ["hyperparameter", "value"]) + "</section>")
    parts.append("</div>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(save_dir.name)} report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1600px; padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: 0.2em; }} .meta {{ color: #666; font-size: 0.9em; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.3em 0; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
th {{ background: #f0f0f0; }} table.metrics td:nth-child(n+2) {{ text-align: right; font-family: monospace; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }}
.figs, .pair {{ display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }}
figure {{ margin: 0; }} figure img {{ max-width: 100%; border: 1px solid #ddd; }}
.figs figure {{ max-width: 780px; }} .figs figure.wide {{ max-width: 100%; }} .pair figure {{ max-width: calc(50% - 0.5em); }}
figcaption {{ font-size: 0.85em; color: #555; }}
</style></head><body>
{chr(10).join(parts)}
</body></html>
"""
    out = save_dir / "report.html"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


WIDE = {"results.png", "labels.jpg"}  # many panels: shown at the page width


def _figure(file: str, caption: str) -> str:
    f = html.escape(file)
    cls = ' class="wide"' if file in WIDE else ""
    return (f'<figure{cls}><a href="{f}"><img src="{f}" alt="{f}" loading="lazy"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="(Re)write report.html of a run folder")
    p.add_argument("run", help="run folder, e.g. runs/train/exp")
    a = p.parse_args(argv)
    print(write_report(Path(a.run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
