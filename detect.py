"""Run a yolor-mt model (.pt checkpoint, exported .onnx or OpenVINO folder) on images, videos, webcams and streams.

    python detect.py --source img.jpg                           # newest runs/train/exp*/weights/best.pt
    python detect.py --weights best.onnx --source images/       # a folder, a glob 'dir/*.jpg' or a list.txt
    python detect.py --weights best_openvino_model/ --source images/   # OpenVINO (export.py --include openvino)
    python detect.py --weights best.pt --source video.mp4 --save-json --save-txt --save-masks
    python detect.py --weights best.pt --source 0               # webcam 0; rtsp:// or http(s):// for streams
    python detect.py --weights best.pt --source video.mp4 --track --save-txt   # ByteTrack ids across frames

Annotated images and videos (boxes, instance masks, semantic overlay, caption banner) are written to
runs/detect/exp*/ under the source's name. A demo video to try this on:
    python -m utils.data.sources --demo-video video.mp4 --data data/shapes.yaml
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.data.sources import LoadSource, is_video
from utils.deploy.backends import load_backend
from utils.deploy.predictor import (
    PanopticWriter,
    Predictor,
    coco_results,
    semantic_png,
    summarize,
    yolo_lines,
)
from utils.ops.panoptic import PanopticSpec
from utils.ops.track import ByteTracker
from utils.runtime.cli import run_cli
from utils.runtime.runs import increment_path, latest_run
from utils.tasks import ALL_TASKS, parse_tasks
from utils.viz.draw import annotate


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="", help=".pt, .onnx or an OpenVINO <stem>_openvino_model/ folder "
                   "(default: newest runs/train/exp*/weights/best.pt)")
    p.add_argument("--source", required=True, help="file, folder, glob, .txt list, video, webcam index or stream URL")
    p.add_argument("--img", "--img-size", nargs="+", type=int, default=[640], help="inference size: one value or h w")
    p.add_argument("--conf-thres", type=float, default=None,
                   help="confidence threshold (default 0.25; 0.1 with --track: ByteTrack's second stage needs "
                        "the low-score detections)")
    p.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    p.add_argument("--device", default="", help="cuda device (0, 1, ...) or cpu; default: CUDA if available")
    p.add_argument("--view-img", action="store_true", help="show results in a window")
    p.add_argument("--save-txt", action="store_true", help="save YOLO-format labels to labels/*.txt")
    p.add_argument("--save-conf", action="store_true", help="add the confidence to --save-txt lines")
    p.add_argument("--save-json", action="store_true", help="save COCO results (predictions.json) and captions.json")
    p.add_argument("--save-masks", action="store_true", help="save semantic maps to masks/*.png (category_id - 1)")
    p.add_argument("--save-panoptic", action="store_true",
                   help="save COCO panoptic results: panoptic/*.png (id = R + 256G + 256^2B) and panoptic.json")
    p.add_argument("--pan-stuff-area", type=int, default=4096, help="panoptic: stuff regions under this many pixels are void")
    p.add_argument("--nosave", action="store_true", help="do not save annotated images/videos")
    p.add_argument("--classes", nargs="+", type=int, help="keep only these class indices")
    p.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    p.add_argument("--half", action="store_true", help="FP16 inference (CUDA, .pt only)")
    p.add_argument("--vid-stride", type=int, default=1, help="use every n-th video/stream frame")
    p.add_argument("--tasks", default="", help="comma list of det,inst,sem,cap,pan to show/save (default: all heads; pan = panoptic overlay)")
    p.add_argument("--semantic-alpha", type=float, default=0.4, help="opacity of the semantic overlay (0 = off)")
    p.add_argument("--beam", type=int, default=1, help="caption beam width (1 = greedy)")
    p.add_argument("--project", default="runs/detect", help="save results to project/name")
    p.add_argument("--name", default="exp", help="save results to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    p.add_argument("--track", action="store_true", help="ByteTrack ids across the frames of videos and streams")
    p.add_argument("--track-thresh", type=float, default=0.5, help="--track: score of a high (first-stage) detection")
    p.add_argument("--track-buffer", type=int, default=30, help="--track: frames a lost track is kept")
    return p.parse_args(argv)


class VideoSaver:
    """One cv2.VideoWriter per source video/stream, opened at its first frame with the source's fps and size."""

    def __init__(self):
        self.key: str | None = None
        self.writer = None
        self.path: Path | None = None

    def write(self, key: str, path: Path, frame, fps: float) -> None:
        import cv2

        if key != self.key:
            self.close()
            h, w = frame.shape[:2]
            self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            if not self.writer.isOpened():
                raise ValueError(f"cannot write video {path} (OpenCV has no mp4v encoder?)")
            self.key, self.path = key, path
        self.writer.write(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
        self.key, self.writer = None, None


def run(opt: argparse.Namespace) -> Path:
    """Runs detection over ``opt.source``; returns the folder results were saved to."""
    import cv2

    weights = opt.weights or latest_run("runs/train/exp*/weights/best.pt")
    if not weights:
        raise FileNotFoundError("no --weights given and no runs/train/exp*/weights/best.pt found; "
                                "train a model first with: python train.py")
    if not 0 <= opt.semantic_alpha <= 1:
        raise ValueError(f"--semantic-alpha {opt.semantic_alpha}: must be within [0, 1]")
    if opt.beam < 1:
        raise ValueError(f"--beam {opt.beam}: must be >= 1")
    source = LoadSource(opt.source, opt.vid_stride)  # validated before the model loads: bad input fails fast
    tracker = _tracker(opt, source)
    half = opt.half
    if half and (not str(weights).endswith(".pt") or opt.device == "cpu" or not _cuda()):
        print("note: --half ignored: FP16 inference needs CUDA and a .pt model (an exported model keeps its precision)")
        half = False
    backend = load_backend(weights, opt.device, half)
    tasks = parse_tasks(opt.tasks, ALL_TASKS) if opt.tasks else None
    show_panoptic = tasks is not None and "pan" in tasks  # the overlay draws segments for --tasks pan only
    if opt.save_panoptic and tasks is not None and "pan" not in tasks:
        tasks.append("pan")  # the PNGs need the merge; the overlay still shows only what --tasks names
    conf_thres = opt.conf_thres if opt.conf_thres is not None else (0.1 if opt.track else 0.25)
    predictor = Predictor(backend, opt.img, conf_thres, opt.iou_thres, opt.max_det, opt.classes,
                          opt.agnostic_nms, tasks, opt.beam,
                          PanopticSpec.from_meta(backend.info.category_ids, backend.info.semantic_ids,
                                                 stuff_area=opt.pan_stuff_area), tracker)
    info = predictor.info
    for note in predictor.notes:
        print(f"note: {note}")
    save_dir = increment_path(Path(opt.project) / opt.name, opt.exist_ok)
    save_dir.mkdir(parents=True, exist_ok=True)
    if opt.save_txt:
        (save_dir / "labels").mkdir(exist_ok=True)
    save_masks = opt.save_masks and "sem" in predictor.tasks
    if opt.save_masks and not save_masks:
        print("note: --save-masks ignored: no semantic head (or 'sem' not in --tasks)")
    if save_masks:
        (save_dir / "masks").mkdir(exist_ok=True)
    panoptic = None
    if opt.save_panoptic and predictor.panoptic is None:
        print("note: --save-panoptic ignored: the panoptic merge needs det, inst and sem heads")
    elif opt.save_panoptic:
        panoptic = PanopticWriter(save_dir / "panoptic", predictor.panoptic, info.names, info.semantic_names)
    h, w = predictor.img_hw
    print(f"{weights}: {backend.name}, tasks {','.join(predictor.tasks)}, input {h}x{w}")

    videos, view = VideoSaver(), opt.view_img
    coco, captions = [], {}
    totals = {"pre": 0.0, "infer": 0.0, "post": 0.0}
    seen, n_files, last_file = 0, len(source), None
    file_i = 0
    try:
        for frame in source:
            # a video frame's index (ids are tracked across it with --track); None for an image
            results, t = predictor([frame.image], indices=[frame.index if frame.video is not None else None])
            r = results[0]
            for k in totals:
                totals[k] += t[k]
            seen += 1
            src = Path(frame.path)
            if frame.path != last_file:
                file_i, last_file = file_i + 1, frame.path
            if frame.video is None:
                stem, key = src.stem, src.name
                prefix = f"image {file_i}/{n_files} {frame.path}:"
            else:
                stem = f"{source.stream_name() if frame.video.stream else src.stem}_{frame.index}"
                key = stem
                total = f"/{frame.video.frames}" if frame.video.frames else ""
                where = f"video {file_i}/{n_files} " if not frame.video.stream else ""
                prefix = f"{where}({frame.index + 1}{total}) {frame.path}:"
            need_image = not opt.nosave or view
            annotated = annotate(frame.image, r, info.names, opt.semantic_alpha,
                                 boxes="det" in predictor.tasks, panoptic=show_panoptic) if need_image else None
            if not opt.nosave:
                if frame.video is None:
                    cv2.imwrite(str(save_dir / src.name), annotated)
                else:
                    name = source.stream_name() if frame.video.stream else src.stem
                    videos.write(frame.path, save_dir / f"{name}.mp4", annotated,
                                 frame.video.fps / opt.vid_stride)
            if opt.save_txt:
                lines = yolo_lines(r, opt.save_conf)
                (save_dir / "labels" / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
            if opt.save_json:
                coco += coco_results(r, int(stem) if stem.isnumeric() else stem, info.category_ids)
                if r.caption is not None:
                    captions[key] = r.caption
            if save_masks:
                cv2.imwrite(str(save_dir / "masks" / f"{stem}.png"), semantic_png(r.semantic, info.semantic_ids))
            if panoptic is not None:
                panoptic.add(r, int(stem) if stem.isnumeric() else stem, stem)
            if view:
                view = _show(frame.path, annotated)
            cap = f" '{r.caption}'" if r.caption is not None else ""
            print(f"{prefix} {r.orig_shape[0]}x{r.orig_shape[1]} {summarize(r, info.names)}{cap} "
                  f"({t['pre']:.1f}ms pre, {t['infer']:.1f}ms infer, {t['post']:.1f}ms post)")
    except KeyboardInterrupt:  # a webcam or stream ends when the user says so; keep what was written
        print("interrupted")
    finally:
        videos.close()
    if opt.save_json:
        (save_dir / "predictions.json").write_text(json.dumps(coco))
        if captions:
            (save_dir / "captions.json").write_text(json.dumps(captions, indent=1))
    if panoptic is not None:
        (save_dir / "panoptic.json").write_text(json.dumps(panoptic.json()))
    n = max(seen, 1)
    print(f"Speed: {totals['pre'] / n:.1f}ms pre-process, {totals['infer'] / n:.1f}ms inference, "
          f"{totals['post'] / n:.1f}ms post-process per image at shape (1, 3, {h}, {w}); {seen} frame(s)")
    saved = [] if opt.nosave else ["annotated media"]
    saved += ["labels/*.txt"] * opt.save_txt + ["predictions.json"] * opt.save_json + ["masks/*.png"] * save_masks
    saved += ["panoptic/*.png, panoptic.json"] * (panoptic is not None)
    print(f"Results saved to {save_dir}" + (f" ({', '.join(saved)})" if saved else ""))
    return save_dir


def _tracker(opt: argparse.Namespace, source: LoadSource) -> ByteTracker | None:
    """The ByteTracker ``--track`` asks for, or ``None``; an error when the source has no video to track in
    (ids across unrelated images would mean nothing)."""
    if not opt.track:
        return None
    if not source.stream and not any(is_video(f) for f in source.files):
        raise ValueError(f"--track needs a video, webcam or stream source; {opt.source} has only images")
    if "det" not in (parse_tasks(opt.tasks) if opt.tasks else ["det"]):
        raise ValueError("--track needs the detection task (add det to --tasks)")
    return ByteTracker(opt.track_thresh, opt.track_buffer)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _show(name: str, image) -> bool:
    """Shows a frame; returns False (and says why once) when this OpenCV build has no GUI."""
    import cv2

    try:
        cv2.imshow(name, image)
        cv2.waitKey(1)
        return True
    except cv2.error:
        print("note: --view-img disabled: this OpenCV build has no GUI support (opencv-python-headless)")
        return False


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_opt(argv))


if __name__ == "__main__":
    sys.exit(main())
