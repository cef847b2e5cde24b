"""A two-class image folder small enough to train on in seconds, for the tests of records and caches."""
from pathlib import Path

import numpy as np
from PIL import Image

# 2 classes of BMPs: a BMP's size depends on its dimensions only, so new content can keep every size and mtime (a
# cache keyed by file stats would not notice it).
CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = ("cat", "dog"), 24, 8
# The overrides that train on such a folder (its root and cache folder given apart).
FOLDER = ["dataset=imagefolder", "dataset.num_classes=2", "dataset.source.image_size=16", "dataset.hflip=true"]
# Real CIFAR-10 (ImageFolder layout), shared beside the repository; tests that use it skip when it is absent.
SHARED_CIFAR10 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"


def write_folder(root: Path, seed: int, parts=("train", "test")) -> None:
    """Random 16x16 RGB BMPs, brighter for the second class (so a teacher learns something), from `seed`."""
    rng = np.random.default_rng(seed)
    for part in parts:
        for label, name in enumerate(CLASSES):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(TRAIN_PER_CLASS if part == "train" else TEST_PER_CLASS):
                pixels = rng.integers(0, 160, (16, 16, 3)) + 90 * label
                Image.fromarray(pixels.astype(np.uint8)).save(root / part / name / f"{i:03d}.bmp")
