"""Data: the embedded digits split, the crop/flip augmentation against torchvision, batching, hold-out, folders.

augment and batches (support.reference) apply kd.data's draw_augmentation and crop_and_flip batch by batch, as
kd.data.epoch_plan draws them for an epoch; tests/test_speed.py checks the training loop's views against them.
"""

import hashlib
import re
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

import kd.config  # noqa: F401  (registers the structured schemas the composition needs)
from kd.data import Split, digits, epoch_generator, hold_out, image_folder, normalize
from support.folders import SHARED_CIFAR10
from support.reference import augment, batches

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digit_splits():
    return digits()


def fingerprints(split: Split) -> list[bytes]:
    """One hash per (image bytes, label): identifies a sample regardless of where it sits in a split."""
    return [
        hashlib.sha1(image.numpy().tobytes() + int(label).to_bytes(2, "little")).digest()
        for image, label in zip(split.images, split.labels)
    ]


def test_digits_sizes_shapes_and_labels(digit_splits):
    train, test = digit_splits.train, digit_splits.test
    assert len(train) + len(test) == 1797
    assert (len(train), len(test)) == (1438, 359)
    for split in (train, test):
        assert split.images.dtype == torch.uint8
        assert split.images.shape[1:] == (3, 32, 32)
        assert split.images.shape[0] == len(split.labels)
        assert split.labels.dtype == torch.int64
        assert set(split.labels.tolist()) == set(range(10))
    assert digit_splits.classes == [str(d) for d in range(10)]
    # Grey digits copied to 3 channels, using the full 0..255 range.
    assert torch.equal(train.images[:, 0], train.images[:, 1]) and torch.equal(train.images[:, 0], train.images[:, 2])
    assert train.images.min() == 0 and train.images.max() == 255


def test_digits_label_counts_match_sklearn(digit_splits):
    from sklearn.datasets import load_digits

    expected = np.bincount(load_digits().target, minlength=10)
    got = torch.bincount(torch.cat([digit_splits.train.labels, digit_splits.test.labels]), minlength=10)
    assert got.tolist() == expected.tolist()


def test_digits_images_stay_with_their_labels(digit_splits):
    # A nearest-centroid classifier fit on train must do well on test: it would be at chance (10%)
    # if images and labels were shuffled separately.
    train, test = digit_splits.train, digit_splits.test
    x_train = train.images[:, 0].flatten(1).double()
    x_test = test.images[:, 0].flatten(1).double()
    centroids = torch.stack([x_train[train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(x_test, centroids).argmin(1)
    assert (predicted == test.labels).double().mean() > 0.8


def test_digits_split_is_a_partition_of_the_dataset(digit_splits):
    # test_fraction=0 puts every image in train: the whole dataset, to compare the two parts against.
    everything = digits(test_fraction=0.0)
    assert len(everything.train) == 1797 and len(everything.test) == 0
    train_fp, test_fp, all_fp = (
        fingerprints(s) for s in (digit_splits.train, digit_splits.test, everything.train)
    )
    # Every sample of the dataset is distinct at 32x32, so sets suffice: the parts are disjoint and cover it.
    assert len(set(all_fp)) == 1797
    assert not set(train_fp) & set(test_fp)
    assert set(train_fp) | set(test_fp) == set(all_fp)
    assert len(set(train_fp)) == len(train_fp) and len(set(test_fp)) == len(test_fp)


def test_digits_split_is_reproducible_and_seeded(digit_splits):
    again = digits(split_seed=0)
    assert torch.equal(again.train.images, digit_splits.train.images)
    assert torch.equal(again.train.labels, digit_splits.train.labels)
    assert torch.equal(again.test.images, digit_splits.test.images)
    other = digits(split_seed=1)
    assert len(other.test) == 359
    assert set(fingerprints(other.test)) != set(fingerprints(digit_splits.test))


def test_digits_yaml_statistics_match_training_split():
    with hydra.initialize(version_base="1.3", config_path="../conf"):
        cfg = hydra.compose("config", overrides=["dataset=digits"]).dataset
    splits = digits(test_fraction=cfg.source.test_fraction, split_seed=cfg.source.split_seed)
    pixels = splits.train.images.double() / 255.0
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor(list(cfg.mean), dtype=torch.float64), rtol=0, atol=1e-3)
    torch.testing.assert_close(std, torch.tensor(list(cfg.std), dtype=torch.float64), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# augment


def candidate_views(image: np.ndarray, padding: int) -> dict[bytes, tuple[int, int, bool]]:
    """Every crop of the zero-padded image, unflipped and flipped, keyed by its bytes: (row, col, flipped)."""
    channels, height, width = image.shape
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    views = {}
    for row in range(2 * padding + 1):
        for col in range(2 * padding + 1):
            crop = padded[:, row : row + height, col : col + width]
            views.setdefault(np.ascontiguousarray(crop).tobytes(), (row, col, False))
            views.setdefault(np.ascontiguousarray(crop[:, :, ::-1]).tobytes(), (row, col, True))
    return views


def decode_views(outputs: torch.Tensor, image: np.ndarray, padding: int) -> np.ndarray:
    """(row, col, flipped) of each output view of one source image; fails on a view that is no such crop."""
    views = candidate_views(image, padding)
    assert len(views) == 2 * (2 * padding + 1) ** 2  # unique pixel values: every view tells its offset and flip
    decoded = [views.get(view.numpy().tobytes()) for view in outputs]
    missing = [i for i, d in enumerate(decoded) if d is None]
    assert not missing, f"{len(missing)} outputs are no crop of the padded input, e.g. #{missing[0]}"
    return np.array(decoded, dtype=np.int64)


def unique_image(height: int = 8, width: int = 8) -> torch.Tensor:
    """One channel, pixel values 1..H*W (never 0, so the zero padding is told apart)."""
    return torch.arange(1, height * width + 1, dtype=torch.uint8).reshape(1, height, width)


def random_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("padding,hflip", [(0, False), (0, True), (4, False), (4, True), (2, True)])
def test_augment_keeps_shape_and_dtype(padding, hflip):
    images = random_images(5, seed=0)
    out = augment(images, padding, hflip, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert out.dtype == torch.uint8


def test_augment_without_padding_or_flip_is_identity():
    images = random_images(6, seed=1)
    assert torch.equal(augment(images, 0, False, torch.Generator().manual_seed(0)), images)


def test_augment_is_reproducible_for_a_seed():
    images = random_images(16, seed=2)
    first = augment(images, 4, True, torch.Generator().manual_seed(123))
    second = augment(images, 4, True, torch.Generator().manual_seed(123))
    other = augment(images, 4, True, torch.Generator().manual_seed(124))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_augment_does_not_modify_its_input():
    images = random_images(4, seed=3)
    before = images.clone()
    augment(images, 4, True, torch.Generator().manual_seed(0))
    assert torch.equal(images, before)


@pytest.mark.parametrize("hflip", (False, True))
def test_augment_outputs_are_crops_of_the_padded_input(hflip):
    # Brute force over all 81 offsets x 2 flips for each image of a small real-sized batch.
    images = random_images(8, seed=4)
    out = augment(images, 4, hflip, torch.Generator().manual_seed(5))
    for source, view in zip(images, out):
        (row, col, flipped), = decode_views(view[None], source.numpy(), 4)
        assert 0 <= row <= 8 and 0 <= col <= 8
        if not hflip:
            assert not flipped


def test_augment_flip_only_mirrors_or_keeps_each_image():
    images = random_images(64, seed=6)
    out = augment(images, 0, True, torch.Generator().manual_seed(7))
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(3)).flatten(1).all(1)
    assert torch.all(same | mirrored)
    assert same.any() and mirrored.any()


PADDING = 4
N_DRAWS = 20_000
N_TORCHVISION = 8_000


@pytest.fixture(scope="module")
def kd_views() -> np.ndarray:
    image = unique_image()
    batch = image[None].expand(N_DRAWS, -1, -1, -1).contiguous()
    out = augment(batch, PADDING, True, torch.Generator().manual_seed(2024))
    return decode_views(out, image.numpy(), PADDING)


@pytest.fixture(scope="module")
def torchvision_views() -> np.ndarray:
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(8, padding=PADDING), v2.RandomHorizontalFlip()])
    image = unique_image()
    with torch.random.fork_rng():
        torch.manual_seed(2025)
        out = torch.stack([transform(image) for _ in range(N_TORCHVISION)])
    return decode_views(out, image.numpy(), PADDING)


def offset_counts(views: np.ndarray) -> np.ndarray:
    side = 2 * PADDING + 1
    return np.bincount(views[:, 0] * side + views[:, 1], minlength=side * side)


def test_augment_offsets_are_uniform(kd_views):
    counts = offset_counts(kd_views)
    assert counts.size == 81 and counts.min() > 0
    # Goodness of fit to the uniform distribution over the 81 positions (fixed seed: deterministic).
    assert stats.chisquare(counts).pvalue > 1e-4
    expected = N_DRAWS / 81
    assert np.all(np.abs(counts - expected) < 0.25 * expected)  # ~4 sigma per cell
    # Rows and columns each uniform over 0..2p.
    for axis in (0, 1):
        marginal = np.bincount(kd_views[:, axis], minlength=9)
        assert np.all(np.abs(marginal / N_DRAWS - 1 / 9) < 0.01)


def test_augment_flip_rate_is_one_half_and_independent_of_offset(kd_views):
    flipped = kd_views[:, 2].astype(bool)
    assert abs(flipped.mean() - 0.5) < 0.02
    table = np.stack([offset_counts(kd_views[flipped]), offset_counts(kd_views[~flipped])])
    assert stats.chi2_contingency(table).pvalue > 1e-4


def test_augment_matches_torchvision_distribution(kd_views, torchvision_views):
    # Same per-image crop offsets and flip rate as torchvision's RandomCrop(padding=p) + RandomHorizontalFlip():
    # a two-sample chi-square test of homogeneity over the 81 positions, and close flip rates.
    table = np.stack([offset_counts(kd_views), offset_counts(torchvision_views)])
    assert table.min() > 0
    assert stats.chi2_contingency(table).pvalue > 1e-4
    kd_freq = table[0] / table[0].sum()
    tv_freq = table[1] / table[1].sum()
    assert np.abs(kd_freq - tv_freq).max() < 0.006  # frequencies ~0.0123 each
    assert abs(kd_views[:, 2].mean() - torchvision_views[:, 2].mean()) < 0.03


# ---------------------------------------------------------------------------------------------------------------
# normalize


def test_normalize_standardises_per_channel():
    images = random_images(4, seed=8)
    mean = torch.tensor([0.1, 0.5, 0.9]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.3, 0.4]).reshape(1, 3, 1, 1)
    out = normalize(images, mean, std)
    expected = (images.double() / 255.0 - mean.double()) / std.double()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert images.dtype == torch.uint8  # the uint8 input is left as it was


# ---------------------------------------------------------------------------------------------------------------
# batches and epoch generators


def indexed_split(n: int) -> Split:
    """Labels are the sample indices, so a batch tells which samples it holds."""
    return Split(torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 3, 2, 2), torch.arange(n))


def test_batches_in_order_keep_the_last_partial_batch():
    split = indexed_split(23)
    got = list(batches(split, 5))
    assert [len(b) for b in got] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([b.labels for b in got]), torch.arange(23))
    assert torch.equal(torch.cat([b.images for b in got]), split.images)


def test_batches_exact_multiple_has_no_empty_batch():
    assert [len(b) for b in batches(indexed_split(20), 5)] == [5, 5, 5, 5]


def test_shuffled_batches_visit_every_index_once():
    split = indexed_split(103)
    got = list(batches(split, 10, epoch_generator(0, 0)))
    assert [len(b) for b in got] == [10] * 10 + [3]
    order = torch.cat([b.labels for b in got])
    assert sorted(order.tolist()) == list(range(103))
    assert not torch.equal(order, torch.arange(103))
    # Images travel with their labels.
    for b in got:
        assert torch.equal(b.images[:, 0, 0, 0].long(), b.labels)


def epoch_order(seed: int, epoch: int, n: int = 50) -> torch.Tensor:
    return torch.cat([b.labels for b in batches(indexed_split(n), 8, epoch_generator(seed, epoch))])


def test_epoch_generator_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(3, 7), epoch_order(3, 7))
    assert not torch.equal(epoch_order(3, 7), epoch_order(3, 8))
    assert not torch.equal(epoch_order(3, 7), epoch_order(4, 7))


def test_epoch_generator_is_fresh_each_call():
    # The order of an epoch does not depend on what was drawn before it (resume lands on the same batches).
    used = epoch_generator(1, 2)
    torch.rand(1000, generator=used)
    assert not torch.equal(torch.randperm(50, generator=used), epoch_order(1, 2))
    assert torch.equal(torch.randperm(50, generator=epoch_generator(1, 2)), epoch_order(1, 2))


# ---------------------------------------------------------------------------------------------------------------
# hold_out


def test_hold_out_zero_fraction_returns_train_unchanged():
    split = indexed_split(40)
    train, val = hold_out(split, 0.0, seed=0)
    assert train is split
    assert val is None


def test_hold_out_splits_disjoint_parts_of_the_right_size():
    split = indexed_split(200)
    train, val = hold_out(split, 0.1, seed=0)
    assert (len(train), len(val)) == (180, 20)
    ids_train, ids_val = set(train.labels.tolist()), set(val.labels.tolist())
    assert not ids_train & ids_val
    assert ids_train | ids_val == set(range(200))
    assert torch.equal(train.images[:, 0, 0, 0].long(), train.labels)


def test_hold_out_is_reproducible_for_a_seed():
    split = indexed_split(200)
    _, first = hold_out(split, 0.1, seed=5)
    _, again = hold_out(split, 0.1, seed=5)
    _, other = hold_out(split, 0.1, seed=6)
    assert torch.equal(first.labels, again.labels)
    assert set(first.labels.tolist()) != set(other.labels.tolist())


def test_hold_out_keeps_at_least_one_validation_sample():
    train, val = hold_out(indexed_split(10), 0.01, seed=0)
    assert (len(train), len(val)) == (9, 1)


# ---------------------------------------------------------------------------------------------------------------
# image_folder


COLORS = {"bee": (200, 30, 30), "ant": (30, 200, 30), "cat": (30, 30, 200)}  # deliberately not in sorted order


def write_image(path: Path, color, size: int = 32, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).convert(mode).save(path)


def build_tree(root: Path, classes=tuple(COLORS), per_class: int = 3, parts=("train", "test")) -> Path:
    """root/<part>/<class>/ with per_class 32x32 PNGs of the class's colour, one 40x40 extra, and a stray file."""
    for part in parts:
        for name in classes:
            for i in range(per_class):
                write_image(root / part / name / f"{i:02d}.png", COLORS[name])
            write_image(root / part / name / "99_big.png", COLORS[name], size=40)
            (root / part / name / "notes.txt").write_text("not an image")
    return root


def test_image_folder_loads_labels_from_sorted_class_names(tmp_path):
    splits = image_folder(str(build_tree(tmp_path / "data")))
    assert splits.classes == ["ant", "bee", "cat"]
    for split in (splits.train, splits.test):
        assert split.images.dtype == torch.uint8
        assert split.images.shape == (12, 3, 32, 32)  # 3 + 1 resized per class; notes.txt skipped
        assert split.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        for image, label in zip(split.images, split.labels):
            color = torch.tensor(COLORS[splits.classes[label]], dtype=torch.uint8)
            assert torch.equal(image, color.reshape(3, 1, 1).expand(3, 32, 32))


def test_image_folder_resizes_and_converts_odd_images(tmp_path):
    root = tmp_path / "data"
    for part in ("train", "test"):
        # A 40x40 gradient (not a solid colour, so a crop would differ from a resize) and a greyscale image.
        gradient = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1))
        (root / part / "a").mkdir(parents=True)
        Image.fromarray(np.stack([gradient] * 3, axis=-1)).save(root / part / "a" / "big.png")
        write_image(root / part / "b" / "grey.png", (90, 90, 90), mode="L")
    splits = image_folder(str(root))
    big, grey = splits.train.images
    assert big.shape == grey.shape == (3, 32, 32)
    expected = np.array(Image.fromarray(np.stack([gradient] * 3, axis=-1)).resize((32, 32), Image.BILINEAR))
    assert torch.equal(big, torch.from_numpy(expected).permute(2, 0, 1))
    assert big[0, 0, 0] < 20 and big[0, 0, -1] > 235  # the whole range survives: resized, not cropped
    assert torch.all(grey == grey[0, 0, 0])


def test_image_folder_max_per_class(tmp_path):
    splits = image_folder(str(build_tree(tmp_path / "data")), max_per_class=2)
    for split in (splits.train, splits.test):
        assert len(split) == 6
        assert torch.bincount(split.labels).tolist() == [2, 2, 2]


def test_image_folder_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "train")) + ".*does not exist"):
        image_folder(str(missing))


def test_image_folder_missing_test_part(tmp_path):
    root = build_tree(tmp_path / "data", parts=("train",))
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "test")) + ".*does not exist"):
        image_folder(str(root))


def test_image_folder_without_class_folders(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    write_image(root / "train" / "loose.png", (0, 0, 0))  # a file directly under train/ is no class
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "train")) + ".*no class folders"):
        image_folder(str(root))


def test_image_folder_train_and_test_classes_differ(tmp_path):
    root = build_tree(tmp_path / "data", classes=("ant", "bee"), parts=("train",))
    build_tree(root, classes=("ant", "cat"), parts=("test",))
    with pytest.raises(ValueError, match=r"different classes.*only in train: \['bee'\].*only in test: \['cat'\]"):
        image_folder(str(root))


def test_image_folder_class_without_images(tmp_path):
    root = build_tree(tmp_path / "data")
    empty = root / "test" / "dog"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    (root / "train" / "dog").mkdir()
    write_image(root / "train" / "dog" / "00.png", (1, 2, 3))
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty)) + ".*holds no images"):
        image_folder(str(root))


# ---------------------------------------------------------------------------------------------------------------
# the real shared CIFAR-10 folder


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason=f"{SHARED_CIFAR10} is not present")
def test_shared_cifar10_folder_loads():
    splits = image_folder(str(SHARED_CIFAR10), max_per_class=5)
    assert len(splits.classes) == 10
    assert splits.classes == sorted(splits.classes)
    for split in (splits.train, splits.test):
        assert split.images.shape == (50, 3, 32, 32)
        assert split.images.dtype == torch.uint8
        assert torch.bincount(split.labels, minlength=10).tolist() == [5] * 10
        assert split.images.float().std() > 10  # real pictures, not blank files
