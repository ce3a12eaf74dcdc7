"""Tests of tailor_cli.data: layouts, splits, bad data, transforms, cache, loaders."""
from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datagen import class_image, make_decathlon, make_gtsrb, make_imagefolder, write_garbage, write_truncated  # noqa: E402

from tailor_cli import data as data_mod  # noqa: E402
from tailor_cli.data import GTSRB_CLASSES, TaskData, default_num_workers, load_task_data, make_loader, make_split  # noqa: E402
from tailor_cli.data import cache as cache_mod  # noqa: E402
from tailor_cli.data import checks as checks_mod  # noqa: E402
from tailor_cli.errors import DataError, UsageError  # noqa: E402

# timm.data.resolve_data_config({}, model=timm.create_model("test_resnet")) as a literal (fast).
CFG = {"input_size": (3, 160, 160), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
       "std": (0.5, 0.5, 0.5), "crop_pct": 0.95, "crop_mode": "center"}
SIZE = 24


def load(data, **kw) -> TaskData:
    kw.setdefault("img_size", SIZE)
    return load_task_data(str(data), data_config=CFG, **kw)


def keys(ds) -> list:
    """Stable item ids of a dataset built by load_task_data (relative paths or indices)."""
    if hasattr(ds, "keys") and ds.keys is not None:
        return list(ds.keys)
    s = ds.samples
    return [s.key(i) for i in range(len(s))]


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "split": make_imagefolder(root / "split", n_classes=3, per_class=6, size=(20, 18)),
        "flat": make_imagefolder(root / "flat", n_classes=3, per_class=10, size=(20, 18), split=False),
        "gtsrb": make_gtsrb(root / "gtsrb", n_classes=3, tracks_per_class=4, frames_per_track=3, size=(18, 20)),
        "dec": make_decathlon(root / "dec", tasks=("gtsrb", "svhn", "aircraft"), n_classes=3, per_class=4),
    }


# ---------------------------------------------------------------------------------------------
# Layout detection
# ---------------------------------------------------------------------------------------------


def test_digits_embedded():
    d = load_task_data("digits", data_config=CFG)
    assert (d.layout, d.name, d.classes) == ("digits", "digits", [str(i) for i in range(10)])
    assert d.img_size == 32 and d.hflip is False and d.cached
    x, y = d.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert d.val[0][0].shape == (3, 32, 32)
    assert len(d.train) + len(d.val) + len(d.test) == 1797 and len(d.test) == 359
    assert set(d.val.labels) == set(range(10)) and set(d.test.labels) == set(range(10))  # stratified
    # the test split is fixed: the same images whatever the seed and validation fraction, never in train/val
    other = load_task_data("digits", data_config=CFG, seed=7, val_fraction=0.3)
    assert d.test.keys == other.test.keys
    assert not set(d.test.keys) & (set(other.train.keys) | set(other.val.keys))
    # img_size argument beats the dataset's preferred size
    assert load_task_data("digits", data_config=CFG, img_size=20).val[0][0].shape == (3, 20, 20)


def test_digits_names_the_embedded_set_whatever_the_working_directory_holds(tmp_path, monkeypatch):
    """A folder called digits in the working directory (a run directory, say) never shadows the embedded set."""
    monkeypatch.chdir(tmp_path)
    make_imagefolder(tmp_path / "digits", n_classes=2, per_class=6, split=False)
    d = load_task_data("digits", data_config=CFG)
    assert (d.layout, len(d.classes)) == ("digits", 10)
    folder = load_task_data("./digits", data_config=CFG)  # the folder of that name, given as a path
    assert (folder.layout, folder.classes) == ("imagefolder-flat", ["class_0", "class_1"])


def test_imagefolder_split_layout(gen):
    d = load(gen["split"])
    assert d.layout == "imagefolder" and d.split == "given"
    assert d.classes == ["class_0", "class_1", "class_2"]
    assert (len(d.train), len(d.val), d.test) == (18, 6, None)
    assert d.val[0][0].shape == (3, SIZE, SIZE)
    assert d.summary()["val"] == 6 and json.dumps(d.summary())


def test_imagefolder_valid_and_a_test_folder_that_is_never_validation(tmp_path):
    root = make_imagefolder(tmp_path / "a", n_classes=2, per_class=4, size=(16, 16))
    (root / "val").rename(root / "valid")
    assert len(load(root).val) == 4
    (root / "valid").rename(root / "test")
    d = load(root)
    # with only train/ and test/, validation is carved from train/ and test/ stays the test split
    assert d.split == "made" and len(d.test) == 4
    assert len(d.train) + len(d.val) == 8 and len(d.val) == 2


def test_imagefolder_train_only_makes_split(tmp_path):
    root = make_imagefolder(tmp_path / "a", n_classes=2, per_class=10, size=(16, 16))
    shutil.rmtree(root / "val")
    d = load(root)
    assert d.layout == "imagefolder" and d.split == "made" and (len(d.train), len(d.val)) == (18, 2)


def test_flat_layout_stratified_deterministic(gen):
    a = load(gen["flat"], val_fraction=0.2, seed=3)
    b = load(gen["flat"], val_fraction=0.2, seed=3)
    assert a.layout == "imagefolder-flat" and a.split == "made"
    assert keys(a.val) == keys(b.val) and keys(a.train) == keys(b.train)
    assert sorted(a.val.labels) == [0, 0, 1, 1, 2, 2]  # 20% of 10 per class
    assert not set(keys(a.val)) & set(keys(a.train))
    assert len(a.train) + len(a.val) == 30
    c = load(gen["flat"], val_fraction=0.2, seed=4)
    assert keys(c.val) != keys(a.val)


def test_split_file_created_and_reused(gen, tmp_path):
    sf = tmp_path / "run" / "split.json"
    a = load(gen["flat"], split_file=sf, val_fraction=0.2, seed=1)
    assert a.split == "created" and sf.is_file()
    doc = json.loads(sf.read_text())
    assert doc["seed"] == 1 and doc["val_fraction"] == 0.2 and sorted(doc["val"]) == sorted(keys(a.val))
    assert not list(sf.parent.glob("*.tmp"))  # atomic write left no temp file
    # a later stage with another seed/fraction still gets exactly the stored split
    b = load(gen["flat"], split_file=sf, val_fraction=0.5, seed=99, cache=True)
    assert b.split == "loaded"
    assert sorted(keys(b.val)) == sorted(doc["val"]) and sorted(keys(b.train)) == sorted(doc["train"])


def test_split_file_digits_indices(tmp_path):
    sf = tmp_path / "split.json"
    a = load_task_data("digits", data_config=CFG, split_file=sf, seed=5)
    b = load_task_data("digits", data_config=CFG, split_file=sf, seed=6)
    assert b.split == "loaded" and keys(a.val) == keys(b.val)
    assert torch.equal(a.val.images, b.val.images)


def test_split_file_corrupt_or_foreign(gen, tmp_path):
    sf = tmp_path / "split.json"
    sf.write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load(gen["flat"], split_file=sf)
    sf.write_text(json.dumps({"layout": "imagefolder-flat", "train": ["class_0/nope.png"], "val": []}))
    with pytest.raises(DataError, match="missing from the data"):
        load(gen["flat"], split_file=sf)


def test_gtsrb_layout_split_by_track(gen):
    for path in (gen["gtsrb"], gen["gtsrb"] / "GTSRB"):
        d = load(path, val_fraction=0.25)
        assert d.layout == "gtsrb" and d.name == "gtsrb" and d.classes == ["00000", "00001", "00002"]
        assert d.hflip is False

        def tracks(ds):
            return {k.split("/")[-2] + "/" + k.split("/")[-1].split("_")[0] for k in keys(ds)}
        assert tracks(d.train) and tracks(d.val)
        assert not tracks(d.train) & tracks(d.val)
        assert len(d.val) == 3 * 1 * 3  # one of 4 tracks per class, 3 frames each
        assert len(d.test) == 9 and sorted(d.test.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(GTSRB_CLASSES) == 43


def test_gtsrb_missing_csv(tmp_path):
    root = make_gtsrb(tmp_path / "g", n_classes=2, tracks_per_class=2, frames_per_track=2)
    (root / "GTSRB" / "Training" / "00001" / "GT-00001.csv").unlink()
    with pytest.raises(DataError, match="GT-00001.csv"):
        load(root)


def test_decathlon_labels_relative(gen):
    d = load(gen["dec"], task="svhn")
    assert d.layout == "decathlon" and d.name == "svhn" and d.hflip is False
    assert d.classes == ["svhn_c0", "svhn_c1", "svhn_c2"]
    assert sorted(set(d.train.labels)) == [0, 1, 2]
    # datagen puts class c of every task in folder <c+1:06d>; labels must not depend on the task offset
    for task in ("gtsrb", "svhn", "aircraft"):
        t = load(gen["dec"], task=task)
        for k, y in zip(keys(t.train), t.train.labels):
            assert int(Path(k).parent.name) - 1 == y
    assert load(gen["dec"], task="aircraft").hflip is True


def test_decathlon_bad_task_lists_available(gen):
    with pytest.raises(DataError, match="aircraft, gtsrb, svhn"):
        load(gen["dec"], task="nope")
    with pytest.raises(DataError, match="--task"):
        load(gen["dec"])


@pytest.mark.parametrize("bad", ["../outside.png", "data/../../outside.png", "/etc/passwd"])
def test_decathlon_refuses_escaping_file_names(tmp_path, bad):
    root = make_decathlon(tmp_path / "d", tasks=("svhn",), n_classes=2, per_class=2)
    ann = root / "annotations" / "svhn_train.json"
    doc = json.loads(ann.read_text())
    doc["images"][0]["file_name"] = bad
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="outside the dataset root"):
        load(root, task="svhn")


def test_torchvision_needs_download(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load("torchvision:SVHN", root_for_download=tmp_path)
    with pytest.raises(DataError, match="--download"):
        load("torchvision:CIFAR10", root_for_download=tmp_path)
    with pytest.raises(DataError, match="supported"):
        load("torchvision:NoSuchSet", root_for_download=tmp_path)


def test_torchvision_gtsrb_local_copy(tmp_path):
    base = make_gtsrb(tmp_path / "gtsrb", n_classes=2, tracks_per_class=3, frames_per_track=2, size=(16, 16))
    shutil.copy(base / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.csv", base / "GT-final_test.csv")
    d = load("torchvision:GTSRB", root_for_download=tmp_path, val_fraction=0.34)
    assert d.layout == "torchvision" and d.name == "gtsrb" and d.hflip is False
    assert (len(d.train), len(d.val), len(d.test)) == (8, 4, 6)
    assert d.train[0][0].shape == (3, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------
# Classes and bad data
# ---------------------------------------------------------------------------------------------


def test_expected_classes_mismatch(gen):
    with pytest.raises(DataError, match="data has 3 classes but the run was trained on 2"):
        load(gen["flat"], expected_classes=["class_0", "class_1"])
    with pytest.raises(DataError, match="different order"):
        load(gen["flat"], expected_classes=["class_1", "class_0", "class_2"])
    with pytest.raises(DataError, match="differ"):
        load(gen["flat"], expected_classes=["class_0", "class_1", "zebra"])
    assert load(gen["flat"], expected_classes=["class_0", "class_1", "class_2"]).num_classes == 3


def test_missing_path_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope")
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load(f)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load(tmp_path)


def test_images_without_class_folders(tmp_path):
    class_image(0, (12, 12)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match="class folders"):
        load(tmp_path)


def test_class_folder_without_images(tmp_path):
    root = make_imagefolder(tmp_path / "a", n_classes=2, per_class=3, size=(12, 12), split=False)
    (root / "class_9").mkdir()
    (root / "class_9" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="class_9"):
        load(root)


def test_single_class(tmp_path):
    root = make_imagefolder(tmp_path / "a", n_classes=1, per_class=4, size=(12, 12), split=False)
    with pytest.raises(DataError, match="at least 2"):
        load(root)


@pytest.mark.parametrize("writer", [write_truncated, write_garbage])
def test_bad_image_named_and_skipped(tmp_path, writer):
    root = make_imagefolder(tmp_path / "a", n_classes=2, per_class=5, size=(24, 24), split=False)
    writer(root / "class_1" / "broken.png")
    with pytest.raises(DataError, match="class_1/broken.png.*--skip-bad"):
        load(root)
    d = load(root, skip_bad=True)
    assert d.skipped == ["class_1/broken.png"] and d.summary()["skipped"] == 1
    assert len(d.train) + len(d.val) == 10


def test_cache_catches_bad_image_at_decode(tmp_path):
    root = make_imagefolder(tmp_path / "a", n_classes=2, per_class=5, size=(24, 24), split=False)
    write_truncated(root / "class_0" / "broken.png")
    with pytest.raises(DataError, match="broken.png"):
        load(root, verify=False, cache=True)
    d = load(root, verify=False, cache=True, skip_bad=True)
    assert d.skipped == ["class_0/broken.png"] and len(d.train) + len(d.val) == 10


def test_uncached_decode_error_is_data_error(tmp_path):
    root = make_imagefolder(tmp_path / "a", n_classes=2, per_class=2, size=(24, 24))
    write_garbage(root / "val" / "class_0" / "img_0000.png")
    d = load(root, verify=False)
    with pytest.raises(DataError, match="img_0000.png"):
        [d.val[i] for i in range(len(d.val))]


def test_skip_bad_that_empties_a_class(tmp_path):
    root = make_imagefolder(tmp_path / "a", n_classes=2, per_class=2, size=(12, 12), split=False)
    for p in (root / "class_1").iterdir():
        write_garbage(p)
    with pytest.raises(DataError, match="class_1"):
        load(root, skip_bad=True)


def _write_truncated_jpeg(path: Path) -> Path:
    """A real JPEG cut to half its bytes: PIL's header ``verify()`` passes it, decoding fails."""
    buf = io.BytesIO()
    class_image(1, (96, 96)).save(buf, "JPEG", quality=95)  # big enough that half the bytes keep the header
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    assert checks_mod._check_header(path) is None  # the case that slipped through: header check passes
    return path


def test_skip_bad_decodes_truncated_jpeg_up_front(tmp_path):
    root = make_imagefolder(tmp_path / "a", n_classes=2, per_class=5, size=(24, 24), split=False)
    _write_truncated_jpeg(root / "class_1" / "97.jpg")
    # Without --skip-bad the cheap header check passes it; the loader then names it and suggests --skip-bad.
    d = load(root)
    assert d.skipped == [] and len(d.train) + len(d.val) == 11
    with pytest.raises(DataError, match=r"class_1/97\.jpg.*pass --skip-bad"):
        [ds[i] for ds in (d.train, d.val) for i in range(len(ds))]
    # With --skip-bad (no cache) every image is decoded up front: skipped before the split, never met later.
    d = load(root, skip_bad=True)
    assert d.skipped == ["class_1/97.jpg"] and not d.cached
    assert len(d.train) + len(d.val) == 10
    for ds in (d.train, d.val):
        assert "class_1/97.jpg" not in keys(ds)
        for i in range(len(ds)):
            assert ds[i][0].shape == (3, SIZE, SIZE)
    # cached: skipped too, and listed once
    d = load(root, skip_bad=True, cache=True)
    assert d.skipped == ["class_1/97.jpg"] and len(d.train) + len(d.val) == 10


def test_loader_error_does_not_suggest_skip_bad_when_given(tmp_path):
    root = make_imagefolder(tmp_path / "a", n_classes=2, per_class=2, size=(24, 24))
    write_garbage(root / "val" / "class_0" / "img_0000.png")
    d = load(root, verify=False, skip_bad=True)  # no up-front check: the loader meets the bad file
    with pytest.raises(DataError, match="img_0000.png") as err:
        [d.val[i] for i in range(len(d.val))]
    assert "pass --skip-bad" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.5, -0.1, float("nan")])
def test_bad_val_fraction_is_usage_error(gen, fraction):
    for data in (gen["flat"], gen["split"], "digits"):  # also where the data brings its own val split
        with pytest.raises(UsageError, match=r"--val-fraction must be between 0 and 1.*pass e\.g\. 0\.1"):
            load(data, val_fraction=fraction)
    assert len(load(gen["flat"], val_fraction=0.5).val) == 15


@pytest.mark.parametrize("size", [0, -5, 7])
def test_too_small_img_size_is_usage_error(gen, size):
    for data in (gen["flat"], "digits"):
        with pytest.raises(UsageError, match=rf"^image size {size} is too small; pass --img-size 32 or more$"):
            load(data, img_size=size)
    assert load(gen["flat"], img_size=8).val[0][0].shape == (3, 8, 8)


def test_task_for_data_without_tasks_is_usage_error(gen, tmp_path):
    for data in ("digits", gen["flat"], gen["split"], gen["gtsrb"], "torchvision:SVHN"):
        with pytest.raises(UsageError, match=r"^--task applies only to Visual Decathlon data .*; drop --task foo$"):
            load(data, task="foo", root_for_download=tmp_path)
    assert load(gen["dec"], task="svhn").layout == "decathlon"  # still the way to pick a decathlon task


# ---------------------------------------------------------------------------------------------
# Transforms, cache, loaders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "P", "RGBA"])
def test_modes_become_rgb(tmp_path, mode):
    root = make_imagefolder(tmp_path / "a", n_classes=2, per_class=3, size=(21, 13), mode=mode)
    for cache in (False, True):
        d = load(root, cache=cache)
        for ds in (d.train, d.val):
            x, _ = ds[0]
            assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32


def test_hflip_defaults(gen, tmp_path):
    assert load(gen["split"]).hflip is True
    assert load(gen["split"], hflip=False).hflip is False
    assert load(gen["gtsrb"]).hflip is False
    assert load(gen["gtsrb"], hflip=True).hflip is True
    svhn = make_imagefolder(tmp_path / "svhn", n_classes=2, per_class=3, size=(12, 12))
    assert load(svhn).hflip is False
    # a folder's name that contains a digits-like word: no mirrored digits for the teacher to learn from
    for name in ("noisy-digits", "mnist5k", "My_Traffic_Signs"):
        folder = make_imagefolder(tmp_path / name, n_classes=2, per_class=3, size=(12, 12))
        assert load(folder).hflip is False, name
    flowers = make_imagefolder(tmp_path / "flowers", n_classes=2, per_class=3, size=(12, 12))
    assert load(flowers).hflip is True
    d = load(gen["split"], cache=True)
    assert "HorizontalFlip" in repr(d.train.transform.aug)
    assert "HorizontalFlip" not in repr(load(gen["gtsrb"], cache=True).train.transform.aug)
    assert "HorizontalFlip" not in repr(load(gen["gtsrb"]).train.prep)


def test_cache_matches_uncached_eval(gen):
    for path, kw in ((gen["split"], {}), (gen["gtsrb"], {}), (gen["dec"], {"task": "gtsrb"})):
        plain = load(path, **kw)
        cached = load(path, cache=True, **kw)
        assert cached.cached and not plain.cached
        assert len(plain.val) == len(cached.val)
        for i in range(len(plain.val)):
            a, ya = plain.val[i]
            b, yb = cached.val[i]
            assert ya == yb and torch.equal(a, b)
        if plain.test is not None:
            assert torch.equal(plain.test[0][0], cached.test[0][0])
        x, _ = cached.train[0]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert -1.01 <= float(x.min()) and float(x.max()) <= 1.01  # mean=std=0.5


def test_cached_dataset_pickles(gen):
    d = load(gen["flat"], cache=True)
    clone = pickle.loads(pickle.dumps(d.train))
    assert len(clone) == len(d.train) and clone[0][0].shape == (3, SIZE, SIZE)
    pickle.dumps(load(gen["flat"]).train)  # uncached too (paths + transforms)


def test_make_split_groups():
    labels = [0] * 6 + [1] * 6
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e", "f", "f"]
    tr, va = make_split(labels, 0.34, seed=0, groups=groups)
    assert {groups[i] for i in tr}.isdisjoint({groups[i] for i in va})
    assert sorted(labels[i] for i in va) == [0, 0, 1, 1]
    with pytest.raises(UsageError, match="--val-fraction"):
        make_split(labels, 1.5, seed=0)


def test_default_num_workers():
    cpu = default_num_workers(torch.device("cpu"))
    gpu = default_num_workers(torch.device("cuda"))
    assert 0 <= cpu <= 4 and 0 <= gpu <= 8 and cpu <= gpu


def test_make_loader_seeded_and_drop_last():
    ds = torch.utils.data.TensorDataset(torch.arange(10).float(), torch.arange(10))
    cpu = torch.device("cpu")

    def order(seed):
        return torch.cat([y for _, y in make_loader(ds, batch_size=4, train=True, device=cpu, num_workers=0,
                                                    seed=seed)]).tolist()
    assert order(1) == order(1) and order(1) != order(2)
    assert len(order(1)) == 8  # drop_last for training
    ev = make_loader(ds, batch_size=4, train=False, device=cpu, num_workers=0)
    assert torch.cat([y for _, y in ev]).tolist() == list(range(10))
    small = make_loader(ds, batch_size=32, train=True, device=cpu, num_workers=0)
    assert len(list(small)) == 1  # a dataset smaller than one batch still yields a batch


def test_make_loader_with_worker(gen):
    d = load(gen["flat"], cache=True)
    dl = make_loader(d.train, batch_size=8, train=True, device=torch.device("cpu"), num_workers=1)
    assert dl.persistent_workers and dl.prefetch_factor == 4
    x, y = next(iter(dl))
    assert x.shape == (8, 3, SIZE, SIZE) and y.dtype == torch.int64


def test_gtsrb_training_folder_itself(gen):
    d = load(gen["gtsrb"] / "GTSRB" / "Training")
    assert d.layout == "gtsrb" and d.test is not None


class _FakeSamples:
    """``n`` items; item i decodes to a constant image of value i, except the ``bad`` ones."""

    def __init__(self, n: int, bad=()):
        self.n, self.bad = n, set(bad)
        self.labels = [i % 3 for i in range(n)]

    def __len__(self):
        return self.n

    def load(self, i):
        if i in self.bad:
            raise OSError("truncated")
        return i

    def key(self, i):
        return f"k{i}"

    def describe(self, i):
        return f"item{i}.png"


@pytest.mark.parametrize("threads", [1, 3])
def test_build_cache_keeps_images_labels_and_keys_aligned_around_skipped_items(threads):
    samples = _FakeSamples(100, bad=(0, 41, 99))
    prep = lambda i: torch.full((3, 2, 2), i % 256, dtype=torch.uint8)  # noqa: E731
    skipped = []
    images, targets, keys_ = data_mod.build_cache(samples, prep, skip_bad=True, skipped=skipped, threads=threads)
    kept = [i for i in range(100) if i not in (0, 41, 99)]
    assert images.shape == (97, 3, 2, 2) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == kept
    assert targets.tolist() == [i % 3 for i in kept] and keys_ == [f"k{i}" for i in kept]
    assert skipped == ["item0.png", "item41.png", "item99.png"]
    with pytest.raises(DataError, match="item41.png"):
        data_mod.build_cache(_FakeSamples(100, bad=(41,)), prep, threads=threads)


def test_cache_larger_than_available_memory_is_refused(gen, monkeypatch):
    need = data_mod.check_cache_fits([(1000, 32), (10, 24)], available=10**9)
    assert need == 3 * (1000 * 32 * 32 + 10 * 24 * 24)
    with pytest.raises(DataError, match=r"--cache needs about .* GiB \(1010 images\).*drop --cache"):
        data_mod.check_cache_fits([(1000, 32), (10, 24)], available=need)  # > 80% of what is free
    monkeypatch.setattr(cache_mod, "available_memory_bytes", lambda: 1000)
    with pytest.raises(DataError, match="--cache needs"):
        load(gen["split"], cache=True)
    assert not load(gen["split"]).cached  # without --cache nothing is checked or cached
    if sys.platform.startswith("linux"):
        monkeypatch.undo()
        assert data_mod.available_memory_bytes() > 0


def test_serving_reads_and_transforms_images_exactly_as_validation(tmp_path):
    """16-bit PNGs and timm's crop_mode: predict/serve (eval_transform + open_image) == the val split."""
    from tailor_cli.data import eval_transform, open_image
    from tailor_cli.predict import _open_rgb

    root = tmp_path / "d"
    for split in ("train", "val"):
        for k in range(2):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(3):
                arr = (np.linspace(0, 60000, 30 * 22).reshape(22, 30) * (0.5 + 0.2 * k + 0.05 * i)).astype(np.uint16)
                Image.fromarray(arr).save(root / split / f"c{k}" / f"{i}.png")  # a 16-bit PNG
    for crop_mode in ("center", "squash"):
        cfg = {**CFG, "crop_mode": crop_mode, "crop_pct": 0.9}
        task = load_task_data(str(root), data_config=cfg, img_size=16)
        assert task.crop_mode == crop_mode
        config = {"img_size": task.img_size, "mean": task.mean, "std": task.std, "interpolation": task.interpolation,
                  "crop_pct": task.crop_pct, "crop_mode": task.crop_mode}
        path = root / "val" / "c0" / "0.png"
        want = task.val[0][0]
        assert torch.equal(eval_transform(config)(open_image(path)), want)
        assert torch.equal(eval_transform(config)(_open_rgb(path)), want)  # what `nettailor predict` feeds
        # PIL's own convert("RGB") saturates 16-bit values: serving used to see another image
        with Image.open(path) as img:
            assert not torch.equal(eval_transform(config)(img.convert("RGB")), want)
    # squash keeps the whole (non-square) image, center crops it: the two differ
    assert not torch.equal(eval_transform({**config, "crop_mode": "center"})(open_image(path)),
                           eval_transform({**config, "crop_mode": "squash"})(open_image(path)))
