"""The task vocabulary every room shares: task names, the semantic ignore value, caption token ids, how
metric and loss keys name their task, and each task's share of the model-selection fitness.

Nothing here imports the project or a heavy library, so models, losses, data, evaluation, pictures and
the report can all depend on it without depending on each other.
"""
from __future__ import annotations

TASKS: tuple[str, ...] = ("det", "inst", "sem", "cap")  # canonical order: outputs, tables, results.csv
# tasks with no head of their own, made from the heads' results: panoptic = instances + semantic map merged
DERIVED_TASKS: tuple[str, ...] = ("pan",)
ALL_TASKS: tuple[str, ...] = TASKS + DERIVED_TASKS  # what metrics, tables and --tasks of detect.py may name
PANOPTIC_NEEDS: tuple[str, ...] = ("det", "inst", "sem")  # the heads whose results the panoptic merge combines
IGNORE_INDEX = 255  # semantic maps: pixels with no (known) label; also COCO-Stuff's "unlabeled" PNG value
PAD, BOS, EOS, UNK = 0, 1, 2, 3  # caption token ids: the head and the loss rely on them without a Vocabulary
NEVER_GENERATED = [PAD, BOS, UNK]  # ids caption generation never emits (CaptionHead._generation_logprobs)

# results.csv / metrics.json keys -> task: the part after "train/" or "val/" starts with one of these
TASK_KEY_PREFIXES: dict[str, tuple[str, ...]] = {"det": ("det_", "box_"), "inst": ("inst_", "mask_"),
                                                 "sem": ("sem_",), "cap": ("cap_",),
                                                 "pan": ("pq", "sq", "rq")}  # pq pq_th pq_st sq rq ...

# metric -> weight inside its task's score (each task scores in [0, 1]); the evaluator of a task reports
# these metrics, and ``fitness`` averages the task scores
FITNESS_TERMS: dict[str, dict[str, float]] = {
    "det": {"box_map": 0.9, "box_map50": 0.1},
    "inst": {"mask_map": 0.9, "mask_map50": 0.1},
    "sem": {"sem_miou": 1.0},
    "cap": {"cap_bleu4": 0.5, "cap_cider": 0.05},  # CIDEr-D is ~0..10: 0.05 puts it on BLEU-4's scale
    # counted only where the panoptic evaluator reports pq (det + inst + sem model, panoptic ground truth):
    # fitness averages the tasks that have metrics, so runs without it select best.pt as before
    "pan": {"pq": 1.0},
}


def parse_tasks(text: str, known: tuple[str, ...] = TASKS) -> list[str]:
    """``"det,sem"`` -> ``["det", "sem"]`` (a ``--tasks`` value); unknown names are an error naming the
    ``known`` ones (the heads' tasks; ``ALL_TASKS`` where derived results such as ``pan`` may be asked for)."""
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in wanted if t not in known]
    if bad:
        raise ValueError(f"--tasks {','.join(bad)}: unknown task(s); choose from {', '.join(known)}")
    return wanted


def task_of_key(key: str) -> str | None:
    """Which task a ``results.csv`` column belongs to (``train/det_box`` -> ``det``, ``mask_map`` -> ``inst``,
    ``weight/sem`` -> ``sem``); ``None`` for keys of no task (epoch, lr, time)."""
    if key.startswith("weight/"):
        return key.split("/", 1)[1]
    name = key.split("/", 1)[1] if key.startswith(("train/", "val/")) else key
    if "/" in name:
        return None
    for task, prefixes in TASK_KEY_PREFIXES.items():
        if name.startswith(prefixes):
            return task
    return None


def is_metric_key(key: str) -> bool:
    """A validation metric (``box_map``, ``sem_miou``, ``cap_cider`` ...), not a loss, weight or lr."""
    return "/" not in key and task_of_key(key) is not None


def task_score(task: str, metrics: dict[str, float]) -> float | None:
    """One task's score in [0, 1] from its ``FITNESS_TERMS``; ``None`` when a metric is missing."""
    terms = FITNESS_TERMS[task]
    if not all(k in metrics for k in terms):
        return None
    return sum(w * metrics[k] for k, w in terms.items())


def fitness(metrics: dict[str, float]) -> float:
    """Multi-task model selection score for ``best.pt``: the mean over tasks that have metrics of each
    task's score (detection and masks as YOLOv5: 0.9 mAP50-95 + 0.1 mAP50; semantic: mIoU; captions:
    0.5 BLEU-4 + 0.05 CIDEr-D; panoptic: PQ, when scored), so no task can win ``best.pt`` by itself."""
    scores = [s for t in FITNESS_TERMS if (s := task_score(t, metrics)) is not None]
    return sum(scores) / len(scores) if scores else 0.0
