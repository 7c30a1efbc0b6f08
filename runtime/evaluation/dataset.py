"""An inspection category in MVTec AD layout, and its ground-truth masks (numpy and OpenCV only).

::

    CATEGORY/
      train/good/*.png                      nominal images (the memory bank is built from these)
      test/good/*.png                       nominal test images (no masks: every pixel is good)
      test/<defect>/*.png                   defective test images, one folder per defect type
      ground_truth/<defect>/<stem>_mask.png one mask per defective image, the image's size, non-zero = defect
                                            (non-binary masks: >= half the maximum; see binarise_mask)

:func:`load_category` checks the whole layout up front and reports every problem at once (a missing
folder, every defect image without a mask), so a bad dataset fails before any image is scored.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..preprocess import IMAGE_SUFFIXES, list_images

log = logging.getLogger("pcedge.eval")

GOOD = "good"
MASK_SUFFIX = "_mask"


class DatasetError(ValueError):
    """A category folder that cannot be evaluated; the message names every missing or bad file."""


@dataclass
class TestItem:
    """One test image."""

    __test__ = False  # not a pytest test class, despite the name

    path: Path
    label: str  # "good" or the defect type (the folder name under test/)
    is_anomalous: bool
    mask_path: Path | None  # None for good images (an all-good mask)


@dataclass
class Category:
    """A category folder: its training images and its labelled test images."""

    root: Path
    train: list[Path] = field(default_factory=list)  # train/good (empty if the folder has none)
    test: list[TestItem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def defect_types(self) -> list[str]:
        """Defect folder names under test/, sorted."""
        return sorted({item.label for item in self.test if item.is_anomalous})

    def count(self, label: str) -> int:
        return sum(1 for item in self.test if item.label == label)


def find_mask(root: Path, defect: str, image: Path) -> Path | None:
    """``ground_truth/<defect>/<stem>_mask.png`` (or another image suffix), if it exists."""
    folder = root / "ground_truth" / defect
    preferred = folder / f"{image.stem}{MASK_SUFFIX}.png"
    if preferred.is_file():
        return preferred
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{image.stem}{MASK_SUFFIX}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_category(root: str | os.PathLike[str], require_train: bool = False) -> Category:
    """Read an MVTec-layout category folder; :class:`DatasetError` lists everything that is missing.

    Needs ``test/good`` and at least one ``test/<defect>`` folder with images, and a mask for every defect
    image; ``train/good`` only with ``require_train``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such category folder (expected train/good, test/good, test/<defect>, ground_truth/<defect>)")
    missing: list[str] = []
    test_dir = root / "test"
    train_dir = root / "train" / GOOD
    if require_train and not (train_dir.is_dir() and list_images(train_dir)):
        missing.append(f"{train_dir}/ (nominal training images)")
    if not test_dir.is_dir():
        missing.append(f"{test_dir}/ (with test/good/ and one test/<defect>/ folder per defect type)")
        raise DatasetError(f"{root}: not an MVTec-layout category; missing:\n  " + "\n  ".join(missing))

    folders = sorted(p for p in test_dir.iterdir() if p.is_dir())
    good = [p for p in folders if p.name == GOOD]
    defects = [p for p in folders if p.name != GOOD]
    if not good or not list_images(good[0]):
        missing.append(f"{test_dir / GOOD}/ (nominal test images)")
    if not any(list_images(p) for p in defects):
        missing.append(f"{test_dir}/<defect>/ (at least one folder of defective test images)")
    if missing:
        raise DatasetError(f"{root}: not an MVTec-layout category; missing:\n  " + "\n  ".join(missing))

    items = [TestItem(path, GOOD, False, None) for path in list_images(good[0])]
    missing_masks: list[Path] = []
    for folder in defects:
        for path in list_images(folder):
            mask = find_mask(root, folder.name, path)
            if mask is None:
                missing_masks.append(root / "ground_truth" / folder.name / f"{path.stem}{MASK_SUFFIX}.png")
            items.append(TestItem(path, folder.name, True, mask))
    if missing_masks:
        raise DatasetError(
            f"{root}: {len(missing_masks)} defect images have no ground-truth mask; expected:\n  "
            + "\n  ".join(str(p) for p in missing_masks)
        )
    train = list_images(train_dir) if train_dir.is_dir() else []
    return Category(root=root, train=train, test=items)


def read_mask(path: str | os.PathLike[str] | None, expected_hw: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask -> bool ``[H, W]`` (non-zero = defect); ``None`` (a good image) -> all False.

    Raises :class:`DatasetError` naming the file if it cannot be read or is not ``expected_hw`` (the
    size of its image): a mask at another size would silently score the wrong pixels.
    """
    expected_hw = (int(expected_hw[0]), int(expected_hw[1]))
    if path is None:
        return np.zeros(expected_hw, dtype=bool)
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: mask file does not exist")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"{path}: mask cannot be read ({exc.strerror or exc})") from exc
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if mask is None:
        raise DatasetError(f"{path}: not a readable mask image")
    if mask.ndim == 3:
        mask = mask.max(axis=2)  # a mask saved in colour: any non-zero channel marks a defect
    if mask.shape != expected_hw:
        raise DatasetError(
            f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image is "
            f"{expected_hw[0]}x{expected_hw[1]}"
        )
    return binarise_mask(mask, str(path))


def binarise_mask(mask: np.ndarray, source: str = "<mask>") -> np.ndarray:
    """A decoded mask ``[H, W]`` -> bool ``[H, W]``.

    The rule: a binary mask (0 and one other value, e.g. 0/255 or 0/1) marks every non-zero pixel as defect.
    A mask with more values (JPEG artefacts around the edges, or a graded mask) marks the pixels at or above
    half its maximum, and a warning names the file: counting every non-zero pixel would turn the JPEG halo
    around a defect into defect pixels.
    """
    if not np.issubdtype(mask.dtype, np.number) or (mask.dtype.kind == "f" and not np.isfinite(mask).all()):
        raise DatasetError(f"{source}: mask has non-finite or non-numeric values")
    values = np.unique(mask)
    if values.size <= 2 and values.min() >= 0 and (values.size == 1 or values[0] == 0):
        return mask > 0
    top = float(mask.max())
    cut = top / 2.0
    log.warning("warning: %s: mask is not binary (%d distinct values, e.g. JPEG artefacts or grades); "
                "counting pixels >= %g (half its maximum %g) as defect", source, values.size, cut, top)
    return mask >= cut
