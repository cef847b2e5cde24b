"""Image folders in ImageNet's and Tiny ImageNet's layouts, with the odd files real ones hold, for the tests of
streaming data and of the pre-flight scan."""
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ant", "bee", "cat")
PER_CLASS = {"train": 8, "val": 3}


def smooth_image(rng: np.random.Generator, height: int, width: int, label: int) -> np.ndarray:
    """A class-tinted gradient with mild noise: JPEG-friendly and learnable."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full((height, width), 80.0 * label)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def write_imagenet(root: Path, seed: int = 0, per_class: dict = PER_CLASS) -> Path:
    """root/{train,val}/<class>/*.JPEG of mixed sizes (24..120 px a side) and aspect ratios, with ImageNet's odd
    files in train/ant: a greyscale JPEG, a CMYK JPEG and a PNG named .JPEG."""
    rng = np.random.default_rng(seed)
    for part, count in per_class.items():
        for label, name in enumerate(CLASSES):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                height, width = (int(v) for v in rng.integers(24, 121, 2))
                image = Image.fromarray(smooth_image(rng, height, width, label))
                image.save(root / part / name / f"{name}_{i:02d}.JPEG", quality=90)
    odd = Image.fromarray(smooth_image(rng, 50, 70, 0))
    odd.convert("L").save(root / "train" / "ant" / "ant_grey.JPEG")
    odd.convert("CMYK").save(root / "train" / "ant" / "ant_cmyk.JPEG")
    odd.save(root / "train" / "ant" / "ant_png.JPEG", format="PNG")
    return root


def write_tiny_imagenet(root: Path, train: int = 3, val: int = 2) -> Path:
    """tiny-imagenet-200's layout for 3 classes of 64x64 JPEGs: wnids.txt, train/<wnid>/images/<wnid>_<i>.JPEG with a
    boxes file, val/images/val_<i>.JPEG with val_annotations.txt, and an unlabelled test/images."""
    rng = np.random.default_rng(2)
    wnids = ["n02", "n01", "n03"]  # not in sorted order: labels follow the sorted names
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for wnid in wnids:
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(train):
            Image.fromarray(smooth_image(rng, 64, 64, int(wnid[-1]))).save(images / f"{wnid}_{i}.JPEG")
        for _ in range(val):
            lines.append(f"val_{len(lines)}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "images").mkdir(parents=True)
    for line in lines:
        name, wnid = line.split("\t")[:2]
        Image.fromarray(smooth_image(rng, 64, 64, int(wnid[-1]))).save(root / "val" / "images" / name)
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "test" / "images" / "test_0.JPEG")
    return root
