"""Does a quickstart recipe transfer? Train it on another 28 px grey ten-class set and score it.

The quickstart recipes are chosen by measurement on the embedded Fashion-MNIST subset; a recipe
tuned to that set alone would say little about a user's data. This writes a different small
set in the same shape (10,000 training and 2,000 held-out 28 px grey images, ten classes) and
trains the recipe on it unchanged, so its summary shows the kNN of the trained backbone beside
the random-init backbone and raw pixels of that set.

  fonts   the digits 0-9 drawn from every installed outline font (Debian: fonts-dejavu,
          fonts-liberation, fonts-freefont-ttf, fonts-urw-base35 and handwriting faces such as
          fonts-dkg-handwriting, fonts-bwht, fonts-breip), each with a random stroke width,
          shear, rotation, aspect, blur, contrast and noise, placed as MNIST places digits (a
          20 px box centred by its centre of mass in 28 px); held-out images from the same fonts
  digits  scikit-learn's 1,797 handwritten 8×8 digits (UCI), scaled into the same 20 px box
          (`pip install scikit-learn`); 1,497 training and 300 held-out images, so a recipe's
          epochs are 7× shorter here

Usage:
  python tools/quickstart_transfer.py recipes/quickstart/simclr.yaml [--set fonts] [--out DIR] [overrides...]
"""

from __future__ import annotations

import argparse
import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bigssl.data.write import INDEX_NAME, Sample, write_shards

CLASSES = [str(digit) for digit in range(10)]
SKIPPED_FONTS = ("Symbol", "D050000L", "Math", "Z003")  # no digits, or digits as symbols


def outline_fonts() -> list[str]:
    listing = subprocess.run(["fc-list", "--format", "%{file}|%{family}\n"], capture_output=True, text=True,
                             check=True).stdout
    files = {path for path, family in (line.split("|", 1) for line in listing.splitlines())
             if path.endswith((".ttf", ".otf")) and not any(s in family for s in SKIPPED_FONTS)}
    if len(files) < 10:
        sys.exit("quickstart_transfer: fewer than 10 outline fonts found (fc-list); install some fonts-* packages")
    return sorted(files)


def mnist_box(grey: np.ndarray) -> np.ndarray:
    """The ink scaled to fit 20 × 20, then placed in 28 × 28 with its centre of mass at the centre."""
    ys, xs = np.nonzero(grey > 10)
    if len(ys) == 0:
        return np.zeros((28, 28), np.uint8)
    ink = grey[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    scale = 20 / max(ink.shape)
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
    small = np.asarray(Image.fromarray(ink.astype(np.uint8)).resize(size, Image.BILINEAR), np.float32)
    mass = small.sum()
    cy = (small.sum(1) * np.arange(small.shape[0])).sum() / mass if mass else small.shape[0] / 2
    cx = (small.sum(0) * np.arange(small.shape[1])).sum() / mass if mass else small.shape[1] / 2
    top = min(max(int(round(14 - cy)), 0), 28 - small.shape[0])
    left = min(max(int(round(14 - cx)), 0), 28 - small.shape[1])
    out = np.zeros((28, 28), np.float32)
    out[top: top + small.shape[0], left: left + small.shape[1]] = small
    return out.clip(0, 255).astype(np.uint8)


def drawn_digit(rng: random.Random, fonts: list[str], digit: int) -> np.ndarray:
    canvas = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(canvas).text((32, 16), str(digit), fill=255, font=ImageFont.truetype(rng.choice(fonts), 64))
    stroke = rng.choice([1, 1, 3, 3, 5, 7])
    if stroke > 1:
        canvas = canvas.filter(ImageFilter.MaxFilter(stroke))
    shear = rng.uniform(-0.3, 0.3)
    canvas = canvas.transform(canvas.size, Image.AFFINE, (1, shear, -shear * 64, 0, 1, 0), Image.BILINEAR)
    canvas = canvas.rotate(rng.uniform(-15, 15), Image.BILINEAR)
    canvas = canvas.resize((int(128 * rng.uniform(0.7, 1.2)), 128), Image.BILINEAR)
    placed = Image.fromarray(mnist_box(np.asarray(canvas, np.float32)))
    grey = np.asarray(placed.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8))), np.float32)
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 8, grey.shape)
    return (grey * rng.uniform(0.7, 1.0) + noise).clip(0, 255).astype(np.uint8)


def font_digits(seed: int = 0) -> dict[str, tuple[list[np.ndarray], list[int]]]:
    rng, fonts = random.Random(seed), outline_fonts()
    splits = {}
    for split, count in (("train", 10_000), ("val", 2_000)):
        labels = [i % 10 for i in range(count)]
        rng.shuffle(labels)
        splits[split] = ([drawn_digit(rng, fonts, label) for label in labels], labels)
    return splits


def uci_digits(seed: int = 0) -> dict[str, tuple[list[np.ndarray], list[int]]]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    data = load_digits()
    images = []
    for small in data.images:
        box = Image.fromarray((small * 255 / 16).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
        canvas = np.zeros((28, 28), np.uint8)
        canvas[4:24, 4:24] = np.asarray(box)
        images.append(canvas)
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    pick = lambda ids: ([images[i] for i in ids], [int(data.target[i]) for i in ids])  # noqa: E731
    return {"val": pick(order[:300]), "train": pick(order[300:])}


def png(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_set(name: str, root: Path) -> dict[str, str]:
    """Shards of the set under root/name (written once); returns data.train / data.val patterns."""
    patterns = {}
    splits = None
    for split in ("train", "val"):
        directory = root / name / split
        if not (directory / INDEX_NAME).exists():
            splits = splits or (font_digits() if name == "fonts" else uci_digits())
            images, labels = splits[split]
            write_shards((Sample(png(a), "png", label) for a, label in zip(images, labels, strict=True)), directory,
                         CLASSES, maxcount=1000)
        count = len(list(directory.glob("shard-*.tar")))
        patterns[split] = str(directory / f"shard-{{000000..{count - 1:06d}}}.tar")
    return patterns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", choices=("fonts", "digits"), default="fonts")
    parser.add_argument("--out", default="runs/transfer", help="shards in OUT/data, the run in OUT/<set>-<recipe>")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for bigssl train")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    patterns = write_set(args.set, out / "data")
    run = out / f"{args.set}-{Path(args.recipe).stem}"
    command = [sys.executable, "-m", "bigssl", "train", args.recipe, f"data.train={patterns['train']}",
               f"data.val={patterns['val']}", "eval.knn_pixels=true", f"log.dir={run}", *args.overrides]
    print("quickstart_transfer:", " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
