"""Input sources for detect.py: image files, folders, globs, videos, webcams, network streams and .txt lists.

Every source iterates as :class:`Frame` tuples ``(path, image_bgr, frame_index, video_info)``. Problems a user
can fix (a missing path, an empty folder, a corrupt image, a video without a decodable frame) raise
:class:`SourceError` with a one-line message, before any frame is processed where that is possible.

A short demo video from the embedded dataset (for trying video input without a camera)::
    python -m utils.data.sources --demo-video video.mp4 --data data/shapes.yaml   # 30 frames, 10 fps, 320x240
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from utils.data.config import load_data_config
from utils.ops.letterbox import letterbox_image

IMG_FORMATS = ("bmp", "jpg", "jpeg", "png", "tif", "tiff", "webp", "dng", "mpo", "pfm")
VID_FORMATS = ("mp4", "avi", "mov", "mkv", "m4v", "mpeg", "mpg", "wmv", "webm", "asf", "ts", "gif")
STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://")
DEFAULT_FPS = 30.0  # when a video or stream does not report its frame rate
# FFmpeg prints its own diagnostics (e.g. "moov atom not found") straight to stderr; a SourceError says the same
# in one line. Read when the first capture opens; setdefault, so OPENCV_FFMPEG_LOGLEVEL=32 brings them back.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


class SourceError(ValueError):
    """An input that cannot be read; the message names it and says why."""


@dataclass
class VideoInfo:
    """Properties of the video or stream a frame came from (``frames`` is 0 when unknown, e.g. streams)."""

    fps: float
    width: int
    height: int
    frames: int
    stream: bool = False


class Frame(NamedTuple):
    """One frame: its source path (or stream name), BGR image, index in its video (0 for images), video info."""

    path: str
    image: np.ndarray
    index: int
    video: VideoInfo | None


def suffix_of(path: str | Path) -> str:
    return Path(str(path)).suffix[1:].lower()


def is_image(path: str | Path) -> bool:
    return suffix_of(path) in IMG_FORMATS


def is_video(path: str | Path) -> bool:
    return suffix_of(path) in VID_FORMATS


def _supported(files: list[Path]) -> list[Path]:
    return [f for f in files if f.is_file() and (is_image(f) or is_video(f))]


def _formats() -> str:
    return f"images: {', '.join(IMG_FORMATS)}; videos: {', '.join(VID_FORMATS)}"


def resolve_files(source: str) -> list[Path]:
    """The media files a file, folder, glob pattern or ``.txt`` list names (sorted; a list keeps its order)."""
    p = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = _supported(sorted(Path(f) for f in glob.glob(str(p), recursive=True)))
        if not files:
            raise SourceError(f"no images or videos match {source} ({_formats()})")
        return files
    if p.is_dir():
        files = _supported(sorted(p.iterdir()))
        if not files:
            raise SourceError(f"no images or videos in folder {source} ({_formats()})")
        return files
    if not p.exists():
        raise SourceError(f"source not found: {source}")
    if p.suffix.lower() == ".txt":
        files = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            f = Path(line).expanduser()
            if not f.is_absolute() and not f.exists():
                f = p.parent / f  # relative to the list, like dataset lists
            if not f.is_file():
                raise SourceError(f"{source}: listed file not found: {line}")
            if not (is_image(f) or is_video(f)):
                raise SourceError(f"{source}: unsupported file type '{f.suffix}' ({line}); {_formats()}")
            files.append(f)
        if not files:
            raise SourceError(f"{source}: the list names no files")
        return files
    if not (is_image(p) or is_video(p)):
        raise SourceError(f"{source}: unsupported file type '{p.suffix}' ({_formats()})")
    return [p]


def _video_info(cap: cv2.VideoCapture, stream: bool) -> VideoInfo:
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and math.isfinite(fps) and 0 < fps < 1000 else DEFAULT_FPS
    frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if not stream else 0
    return VideoInfo(fps, int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                     max(frames, 0), stream)


def probe_video(path: str | Path) -> VideoInfo:
    """Opens a video file and decodes its first frame; :class:`SourceError` if either fails."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise SourceError(f"cannot open video {path}: corrupt file or unsupported container/codec")
        ok, frame = cap.read()
        if not ok or frame is None:
            raise SourceError(f"cannot read video {path}: no decodable frames (corrupt file or unsupported codec)")
        return _video_info(cap, stream=False)
    finally:
        cap.release()


class LoadSource:
    """Iterates the frames of ``source``: a file, folder, glob, ``.txt`` list, webcam index or stream URL.

    Args:
        source: ``img.jpg``, ``dir/``, ``'dir/*.jpg'``, ``list.txt``, ``video.mp4``, ``0`` (webcam),
            ``rtsp://...`` / ``http(s)://...`` (stream).
        vid_stride: use every ``vid_stride``-th frame of videos and streams.

    Files are resolved and every video is probed (opened, first frame decoded) in the constructor, so a bad
    input fails before any output is written; images are decoded while iterating.
    """

    def __init__(self, source: str | int, vid_stride: int = 1):
        self.source = str(source).strip()
        if vid_stride < 1:
            raise SourceError(f"--vid-stride {vid_stride}: must be >= 1")
        self.vid_stride = int(vid_stride)
        self.webcam = self.source.isnumeric()
        self.stream = self.webcam or self.source.lower().startswith(STREAM_PREFIXES)
        self.files: list[Path] = [] if self.stream else resolve_files(self.source)
        for f in self.files:
            if is_video(f):
                probe_video(f)
        self._cap = None
        if self.stream:  # opened here, so an unreachable camera or URL fails before any work is done
            self._cap = cv2.VideoCapture(int(self.source) if self.webcam else self.source)
            if not self._cap.isOpened():
                self._cap.release()
                raise SourceError(f"cannot open {'webcam' if self.webcam else 'stream'} {self.source}")

    def __len__(self) -> int:
        """Number of files (0 for a webcam or stream)."""
        return len(self.files)

    def stream_name(self) -> str:
        """A file-system friendly name for a webcam or stream (used to name its saved video)."""
        if self.webcam:
            return f"webcam{self.source}"
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.source.split("://", 1)[-1])
        return name[:80] or "stream"

    def __iter__(self) -> Iterator[Frame]:
        if self.stream:
            cap, self._cap = self._cap, None
            if cap is None:  # iterated a second time
                cap = cv2.VideoCapture(int(self.source) if self.webcam else self.source)
            yield from self._capture(cap, self.source, self.stream_name(), True)
            return
        for f in self.files:
            if is_image(f):
                image = cv2.imread(str(f), cv2.IMREAD_COLOR)  # grey / RGBA / 16-bit all become 8-bit BGR
                if image is None:
                    raise SourceError(f"cannot read image {f}: not a valid image file")
                yield Frame(str(f), image, 0, None)
            else:
                yield from self._capture(cv2.VideoCapture(str(f)), str(f), str(f), False)

    def _capture(self, cap: cv2.VideoCapture, target: str, name: str, stream: bool) -> Iterator[Frame]:
        """Frames of an opened capture (released at the end); ``target`` names it in errors."""
        try:
            if not cap.isOpened():
                raise SourceError(f"cannot open {'stream' if stream else 'video'} {target}")
            info = _video_info(cap, stream)
            index, read = 0, 0
            while True:
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                read += 1
                yield Frame(name, frame, index, info)
                index += 1
                for _ in range(self.vid_stride - 1):  # frames 0, s, 2s, ...; skipped ones are not decoded
                    if not cap.grab():
                        break
                    index += 1
            if read == 0:
                raise SourceError(f"cannot read {'stream' if stream else 'video'} {target}: no frames received")
        finally:
            cap.release()


def make_demo_video(path: str | Path, data: str | Path = "data/shapes.yaml", frames: int = 30, fps: float = 10.0,
                    size: tuple[int, int] = (320, 240)) -> Path:
    """Writes a short mp4 (``mp4v``) of the data yaml's val images, letterboxed to ``size = (w, h)``.

    The embedded dataset is generated first if it is missing. Returns the written path.
    """

    cfg = load_data_config(data)
    images = [f for split in cfg.val for f in _supported(sorted(split.images.iterdir())) if is_image(f)]
    if not images:
        raise SourceError(f"{data}: no val images to make a video from")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = int(size[0]), int(size[1])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not writer.isOpened():
        raise SourceError(f"cannot write video {path} (OpenCV has no mp4v encoder?)")
    try:
        for i in range(frames):
            image = cv2.imread(str(images[i % len(images)]), cv2.IMREAD_COLOR)
            if image is None:
                raise SourceError(f"cannot read image {images[i % len(images)]}")
            writer.write(letterbox_image(image, (h, w))[0])
    finally:
        writer.release()
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Input-source helpers.")
    p.add_argument("--demo-video", required=True, metavar="PATH", help="write a demo mp4 of the val images here")
    p.add_argument("--data", default="data/shapes.yaml", help="data yaml whose val images to use")
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--size", nargs=2, type=int, default=[320, 240], metavar=("W", "H"))
    opt = p.parse_args(argv)
    try:
        out = make_demo_video(opt.demo_video, opt.data, opt.frames, opt.fps, tuple(opt.size))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {opt.frames} frames at {opt.fps:g} fps, {opt.size[0]}x{opt.size[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
