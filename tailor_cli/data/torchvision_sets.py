"""``torchvision:NAME``: a ``torchvision.datasets`` dataset, downloaded only with ``--download``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from .gtsrb import GTSRB_CLASSES
from .raw import RawTask
from .samples import DatasetSamples

# name -> (class name, train kwargs, val kwargs | None, test kwargs | None)
TORCHVISION_DATASETS: dict[str, tuple[str, dict, dict | None, dict | None]] = {
    "cifar10": ("CIFAR10", {"train": True}, None, {"train": False}),
    "cifar100": ("CIFAR100", {"train": True}, None, {"train": False}),
    "svhn": ("SVHN", {"split": "train"}, None, {"split": "test"}),
    "gtsrb": ("GTSRB", {"split": "train"}, None, {"split": "test"}),
    "flowers102": ("Flowers102", {"split": "train"}, {"split": "val"}, {"split": "test"}),
    "dtd": ("DTD", {"split": "train"}, {"split": "val"}, {"split": "test"}),
    "fgvcaircraft": ("FGVCAircraft", {"split": "train"}, {"split": "val"}, {"split": "test"}),
    "oxfordiiitpet": ("OxfordIIITPet", {"split": "trainval"}, None, {"split": "test"}),
    "food101": ("Food101", {"split": "train"}, None, {"split": "test"}),
    "stl10": ("STL10", {"split": "train"}, None, {"split": "test"}),
    "mnist": ("MNIST", {"train": True}, None, {"train": False}),
    "fashionmnist": ("FashionMNIST", {"train": True}, None, {"train": False}),
    "kmnist": ("KMNIST", {"train": True}, None, {"train": False}),
}


def _tv_targets(ds: Any) -> list[int]:
    """Labels of a torchvision dataset without decoding images when possible."""
    for attr in ("targets", "labels", "_labels"):
        val = getattr(ds, attr, None)
        if val is not None:
            return [int(x) for x in (val.tolist() if hasattr(val, "tolist") else val)]
    samples = getattr(ds, "_samples", None) or getattr(ds, "samples", None)
    if samples is not None:
        return [int(s[1]) for s in samples]
    return [int(ds[i][1]) for i in range(len(ds))]


def _tv_open(cls: Callable, root: Path, kwargs: dict, download: bool, name: str) -> Any:
    try:
        return cls(root=str(root), download=download, **kwargs)
    except RuntimeError as e:
        if download:
            raise DataError(f"torchvision:{name} could not be prepared under {root} ({str(e).splitlines()[0]}); "
                            f"delete the folder and retry with --download") from None
        raise DataError(f"torchvision:{name} is not downloaded under {root}; pass --download to fetch it "
                        f"(or set NETTAILOR_DATA_ROOT to the folder holding an existing copy)") from None
    except (OSError, ValueError) as e:  # URLError is an OSError
        if not download:
            raise DataError(f"torchvision:{name} under {root} is missing or unreadable ({str(e).splitlines()[0]}); "
                            f"pass --download to fetch it") from None
        raise DataError(f"downloading torchvision:{name} into {root} failed ({str(e).splitlines()[0]}); "
                        f"check the internet connection or place the files there by hand") from None
    except ImportError as e:
        raise DataError(f"torchvision:{name} needs an extra package to read its files ({e}); install it") from None


def read_torchvision(spec: str, download: bool, root: Path | None) -> RawTask:
    import torchvision.datasets as tvd

    name = spec.split(":", 1)[1].strip()
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TORCHVISION_DATASETS:
        raise DataError(f"unsupported dataset torchvision:{name}; supported: "
                        f"{', '.join(v[0] for v in TORCHVISION_DATASETS.values())}")
    cls_name, train_kw, val_kw, test_kw = TORCHVISION_DATASETS[key]
    default = os.environ.get("NETTAILOR_DATA_ROOT", "~/.cache/nettailor/datasets")
    base_root = Path(root) if root is not None else Path(default).expanduser()
    ds_root = base_root / "svhn" if key == "svhn" else base_root  # others make their own subfolder
    cls = getattr(tvd, cls_name)
    tr = _tv_open(cls, ds_root, train_kw, download, cls_name)
    tr_labels = _tv_targets(tr)
    n_classes = max(tr_labels) + 1
    classes = list(getattr(tr, "classes", None) or [])
    if len(classes) != n_classes:
        classes = GTSRB_CLASSES[:] if key == "gtsrb" and n_classes == 43 else [str(i) for i in range(n_classes)]
    classes = [str(c) for c in classes]
    groups = None
    if key == "gtsrb":  # split by track: file name prefix before '_'
        groups = [f"{lab}/{Path(p).name.split('_')[0]}" for p, lab in tr._samples]

    def samples(ds: Any, prefix: str) -> DatasetSamples:
        return DatasetSamples(ds, range(len(ds)), _tv_targets(ds), prefix)

    val = samples(_tv_open(cls, ds_root, val_kw, download, cls_name), f"{key}-val") if val_kw else None
    test = samples(_tv_open(cls, ds_root, test_kw, download, cls_name), f"{key}-test") if test_kw else None
    return RawTask(name=key, layout="torchvision", classes=classes, train=DatasetSamples(tr, range(len(tr)),
                    tr_labels, f"{key}-train"), val=val, test=test, groups=groups,
                    source=f"torchvision:{cls_name}")
