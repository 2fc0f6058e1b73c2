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
import sys
from pathlib import Path

from utils.data.sources import Frame, LoadSource, is_video
from utils.deploy.backends import load_backend
from utils.deploy.predictor import Predictor, ResultWriter, summarize
from utils.ops.options import PredictOptions
from utils.ops.panoptic import PanopticSpec
from utils.ops.track import ByteTracker
from utils.runtime.cli import run_cli
from utils.runtime.device import select_device, use_half
from utils.runtime.runs import increment_path, resolve_weights
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


def run(opt: argparse.Namespace) -> Path:
    """Runs detection over ``opt.source``; returns the folder results were saved to."""
    weights = resolve_weights(opt.weights)
    if not 0 <= opt.semantic_alpha <= 1:
        raise ValueError(f"--semantic-alpha {opt.semantic_alpha}: must be within [0, 1]")
    if opt.beam < 1:
        raise ValueError(f"--beam {opt.beam}: must be >= 1")
    source = LoadSource(opt.source, opt.vid_stride)  # validated before the model loads: bad input fails fast
    predictor, show_panoptic = _predictor(opt, weights, _tracker(opt, source))
    save_dir = increment_path(Path(opt.project) / opt.name, opt.exist_ok)
    writer = _writer(opt, save_dir, predictor)
    h, w = predictor.img_hw
    print(f"{weights}: {predictor.backend.name}, tasks {','.join(predictor.tasks)}, input {h}x{w}")
    try:
        seen, totals = _detect(opt, source, predictor, writer, show_panoptic)
    finally:
        writer.close()
    n = max(seen, 1)
    print(f"Speed: {totals['pre'] / n:.1f}ms pre-process, {totals['infer'] / n:.1f}ms inference, "
          f"{totals['post'] / n:.1f}ms post-process per image at shape (1, 3, {h}, {w}); {seen} frame(s)")
    saved = [] if opt.nosave else ["annotated media"]
    saved += ["labels/*.txt"] * opt.save_txt + ["predictions.json"] * opt.save_json + ["masks/*.png"] * writer.masks
    saved += ["panoptic/*.png, panoptic.json"] * (writer.panoptic is not None)
    print(f"Results saved to {save_dir}" + (f" ({', '.join(saved)})" if saved else ""))
    return save_dir


def _predictor(opt: argparse.Namespace, weights: Path, tracker: ByteTracker | None) -> tuple[Predictor, bool]:
    """The Predictor the options ask for (the shared --half policy; --conf-thres 0.1 by default with --track), and
    whether the overlay draws panoptic segments (for --tasks pan only)."""
    half = use_half(opt.half, select_device(opt.device), exported=weights.suffix != ".pt")
    backend = load_backend(weights, opt.device, half)
    tasks = parse_tasks(opt.tasks, ALL_TASKS) if opt.tasks else None
    show_panoptic = tasks is not None and "pan" in tasks
    if opt.save_panoptic and tasks is not None and "pan" not in tasks:
        tasks.append("pan")  # the PNGs need the merge; the overlay still shows only what --tasks names
    options = PredictOptions.from_flags(
        opt, conf_thres=opt.conf_thres if opt.conf_thres is not None else (0.1 if opt.track else 0.25),
        panoptic=PanopticSpec.from_meta(backend.info.category_ids, backend.info.semantic_ids,
                                        stuff_area=opt.pan_stuff_area))
    predictor = Predictor(backend, opt.img, options, tasks, opt.beam, tracker)
    for note in predictor.notes:
        print(f"note: {note}")
    return predictor, show_panoptic


def _writer(opt: argparse.Namespace, save_dir: Path, predictor: Predictor) -> ResultWriter:
    """The files the options ask for, less those the model cannot give (with a note why)."""
    save_masks = opt.save_masks and "sem" in predictor.tasks
    if opt.save_masks and not save_masks:
        print("note: --save-masks ignored: no semantic head (or 'sem' not in --tasks)")
    if opt.save_panoptic and predictor.panoptic is None:
        print("note: --save-panoptic ignored: the panoptic merge needs det, inst and sem heads")
    return ResultWriter(save_dir, predictor.info, opt.save_txt, opt.save_conf, opt.save_json, save_masks,
                        predictor.panoptic if opt.save_panoptic else None)


def _detect(opt: argparse.Namespace, source: LoadSource, predictor: Predictor, writer: ResultWriter,
            show_panoptic: bool) -> tuple[int, dict[str, float]]:
    """The frame loop: predict, draw, write, log a line per frame. Returns the frames seen and summed times."""
    view, totals = opt.view_img, {"pre": 0.0, "infer": 0.0, "post": 0.0}
    seen, n_files, last_file, file_i = 0, len(source), None, 0
    try:
        for frame in source:
            # a video frame's index (ids are tracked across it with --track); None for an image
            results, t = predictor([frame.image], indices=[frame.index if frame.video is not None else None])
            r = results[0]
            for k in totals:
                totals[k] += t[k]
            seen += 1
            if frame.path != last_file:
                file_i, last_file = file_i + 1, frame.path
            stem, key, prefix, media = _frame_names(frame, source, file_i, n_files)
            annotated = annotate(frame.image, r, predictor.info.names, opt.semantic_alpha,
                                 boxes="det" in predictor.tasks, panoptic=show_panoptic) \
                if not opt.nosave or view else None
            if not opt.nosave:
                writer.add_media(annotated, media, None if frame.video is None else frame.path,
                                 frame.video.fps / opt.vid_stride if frame.video is not None else 30.0)
            writer.add(r, stem, key)
            if view:
                view = _show(frame.path, annotated)
            cap = f" '{r.caption}'" if r.caption is not None else ""
            print(f"{prefix} {r.orig_shape[0]}x{r.orig_shape[1]} {summarize(r, predictor.info.names)}{cap} "
                  f"({t['pre']:.1f}ms pre, {t['infer']:.1f}ms infer, {t['post']:.1f}ms post)")
    except KeyboardInterrupt:  # a webcam or stream ends when the user says so; keep what was written
        print("interrupted")
    return seen, totals


def _frame_names(frame: Frame, source: LoadSource, file_i: int, n_files: int) -> tuple[str, str, str, str]:
    """``(stem, key, log prefix, media name)`` of a frame: an image by its file, a video frame as
    ``<video>_<index>`` (a stream by its name), its media the image file name or the video's stem."""
    src = Path(frame.path)
    if frame.video is None:
        return src.stem, src.name, f"image {file_i}/{n_files} {frame.path}:", src.name
    name = source.stream_name() if frame.video.stream else src.stem
    stem = f"{name}_{frame.index}"
    total = f"/{frame.video.frames}" if frame.video.frames else ""
    where = f"video {file_i}/{n_files} " if not frame.video.stream else ""
    return stem, stem, f"{where}({frame.index + 1}{total}) {frame.path}:", name


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
