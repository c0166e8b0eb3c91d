"""Small image-folder datasets unlike MNIST, to try the user's data path on: made from images
that packages ship (scikit-learn's digits and sample photos) or drawn, in several sizes,
colour modes, file formats and class counts.

    python -m bench.own_datasets --out=/tmp/own          # every set
    python -m bench.own_datasets --out=/tmp/own --sets=shapes --per_class=20

Each set is `<out>/<name>/train/<class>/*` and `<out>/<name>/test/<class>/*`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw


def _save(image: Image.Image, folder: pathlib.Path, index: int, rng: np.random.Generator,
          formats: tuple[str, ...]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fmt = formats[rng.integers(len(formats))]
    if fmt == "jpeg":
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
            folder / f"{index:05d}.jpg", quality=int(rng.integers(70, 96)))
    elif fmt == "palette":
        image.convert("RGB").quantize(colors=64).save(folder / f"{index:05d}.png")
    elif fmt == "rgba":
        rgba = image.convert("RGBA")
        rgba.putalpha(255)
        rgba.save(folder / f"{index:05d}.png")
    elif fmt == "grey16":
        grey = np.asarray(image.convert("L"), np.uint16) * 257
        Image.fromarray(grey).save(folder / f"{index:05d}.png")
    else:
        image.save(folder / f"{index:05d}.png")


def _write(out: pathlib.Path, draw: Callable[[int, np.random.Generator], Image.Image],
           classes: list[str], per_class: int, test_fraction: float, seed: int,
           formats: tuple[str, ...]) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    n_test = max(2, int(round(per_class * test_fraction)))
    for c, name in enumerate(classes):
        for i in range(per_class + n_test):
            split = "train" if i < per_class else "test"
            _save(draw(c, rng), out / split / name, i, rng, formats)
    return out


def digits(out: pathlib.Path, per_class: int = 120, seed: int = 0) -> pathlib.Path:
    """scikit-learn's 8x8 handwritten digits (about 180 per class), upscaled to 16-64 px."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    by_class = [bunch.images[bunch.target == c] for c in range(10)]
    per_class = min(per_class, min(len(b) for b in by_class) - 10)
    used = {c: 0 for c in range(10)}

    def draw(c, rng):
        image = by_class[c][used[c] % len(by_class[c])]
        used[c] += 1
        side = int(rng.integers(16, 65))
        grey = Image.fromarray(np.uint8(image / 16.0 * 255))
        return grey.resize((side, side), Image.BILINEAR)

    return _write(out, draw, [str(c) for c in range(10)], per_class, 0.1, seed, ("png",))


def shapes(out: pathlib.Path, per_class: int = 40, seed: int = 0) -> pathlib.Path:
    """Coloured circles, squares and triangles on coloured backgrounds, 40-120 px, PNG and
    JPEG, some palette and RGBA."""

    def draw(c, rng):
        w, h = (int(v) for v in rng.integers(40, 121, size=2))
        image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(image)
        r = rng.uniform(0.2, 0.4) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if c == 0:
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif c == 1:
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        return image

    return _write(out, draw, ["circle", "square", "triangle"], per_class, 0.25, seed,
                  ("png", "jpeg", "palette", "rgba"))


def textures(out: pathlib.Path, per_class: int = 200, seed: int = 0) -> pathlib.Path:
    """Four noisy grey patterns (horizontal and vertical stripes, checkers, dots) of random
    frequency, 24-48 px, as 8- and 16-bit PNG."""

    def draw(c, rng):
        side = int(rng.integers(24, 49))
        y, x = np.mgrid[0:side, 0:side].astype(np.float32)
        period = rng.uniform(4, 10)
        phase = rng.uniform(0, period)
        if c == 0:
            pattern = np.sin(2 * np.pi * (y + phase) / period)
        elif c == 1:
            pattern = np.sin(2 * np.pi * (x + phase) / period)
        elif c == 2:
            pattern = np.sign(np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period))
        else:
            pattern = (np.sin(2 * np.pi * x / period) + np.sin(2 * np.pi * y / period)) / 2
        pixels = 127.5 + 100 * pattern + rng.normal(0, 25, pattern.shape)
        return Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))

    return _write(out, draw, ["horizontal", "vertical", "checker", "dots"], per_class, 0.2, seed,
                  ("png", "grey16"))


def photo_crops(out: pathlib.Path, per_class: int = 300, seed: int = 0) -> pathlib.Path:
    """Random crops (20-80 px, resized to 28-64 px) of scikit-learn's two sample photos,
    one class per photo: natural RGB images, JPEG."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]

    def draw(c, rng):
        photo = photos[c]
        side = int(rng.integers(20, 81))
        left = int(rng.integers(0, photo.width - side))
        top = int(rng.integers(0, photo.height - side))
        crop = photo.crop((left, top, left + side, top + side))
        target = int(rng.integers(28, 65))
        return crop.resize((target, target), Image.BILINEAR)

    return _write(out, draw, ["china", "flower"], per_class, 0.2, seed, ("jpeg", "png"))


SETS = {"digits": digits, "shapes": shapes, "textures": textures, "photo_crops": photo_crops}

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/own_datasets", "Folder to write the sets into.")
flags.DEFINE_list("sets", list(SETS), f"Sets among {', '.join(SETS)}.")
flags.DEFINE_integer("per_class", None, "Training images per class (default per set).")
flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
    del argv
    for name in FLAGS.sets:
        kwargs = {"per_class": FLAGS.per_class} if FLAGS.per_class else {}
        folder = SETS[name](pathlib.Path(FLAGS.out) / name, seed=FLAGS.seed, **kwargs)
        counts = {split: sum(1 for _ in (folder / split).rglob("*.*")) for split in
                  ("train", "test")}
        print(f"{name}: {folder} {counts}")


if __name__ == "__main__":
    app.run(main)
