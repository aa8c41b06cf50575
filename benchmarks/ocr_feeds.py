"""Validation feeds for the PaddleOCR text detector and recognizer that rapidocr-onnxruntime 1.4.4 ships.

    python benchmarks/ocr_feeds.py OUT_DIR [--samples 8]

Writes OUT_DIR/det.npz (pages of 320x320 with a dozen words of printed text, ImageNet-normalised,
as PaddleOCR's detector preprocesses) and OUT_DIR/rec.npz (48x320 text lines scaled to [-1, 1], as its
recognizer does): rendered with Pillow's DejaVu font, seeded. Random normal feeds do not look like
either, and the float noise the exact gate measures depends on the activations real inputs cause.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

WORDS = ("the quick brown fox jumps over lazy dog invoice total 2024 amount paid receipt number").split()
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _render(rng: np.random.Generator, height: int, width: int, lines: int, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    background = tuple(int(v) for v in rng.integers(200, 256, 3)) if lines > 1 else (255, 255, 255)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for _ in range(lines):
        at = (4, 6) if lines == 1 else (int(rng.integers(0, width - 100)), int(rng.integers(0, height - 30)))
        ink = (0, 0, 0) if lines == 1 else tuple(int(v) for v in rng.integers(0, 80, 3))
        draw.text(at, " ".join(rng.choice(WORDS, 4 if lines == 1 else 3)), fill=ink,
                  font=ImageFont.truetype(FONT, int(rng.integers(*size))))
    return np.asarray(image, np.float32) / 255


def write_feeds(folder: Path, samples: int = 8, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    det = np.stack([((_render(rng, 320, 320, 12, (14, 32)) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
                    for _ in range(samples)])
    rec = np.stack([((_render(rng, 48, 320, 1, (30, 31)) - 0.5) / 0.5).transpose(2, 0, 1)[None]
                    for _ in range(samples)])
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "det.npz", folder / "rec.npz"
    np.savez(paths[0], x=det.astype(np.float32))
    np.savez(paths[1], x=rec.astype(np.float32))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    print(*write_feeds(args.out, args.samples))
