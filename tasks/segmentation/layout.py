"""Where PASCAL VOC, its SBD augmentation and Cityscapes live under a user's ``root``.

VOC: ``root`` may be the ``VOC2012`` folder itself, the ``VOCdevkit`` that holds it, or the
folder that holds ``VOCdevkit``. SBD's augmented masks (``SegmentationClassAug/``, as the
DeepLab release ships them) sit inside ``VOC2012`` or next to it, their list
(``train_aug.txt``) under ``ImageSets/Segmentation`` or ``ImageSets/SegmentationAug``.
Cityscapes: ``root`` holds ``leftImg8bit/`` and ``gtFine/`` as the archives unpack
(``test`` images have no labels and serve ``predict``). A missing piece names every
path that was looked at.
"""
from __future__ import annotations

from pathlib import Path

VOC_CANDIDATES = (".", "VOC2012", "VOCdevkit/VOC2012")
AUG_LISTS = ("ImageSets/Segmentation/train_aug.txt", "ImageSets/SegmentationAug/train_aug.txt")


def _looked(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def voc_root(root: str | Path) -> Path:
    """The ``VOC2012``-style folder (with ``JPEGImages/`` and ``ImageSets/Segmentation/``) under ``root``.

    Raises:
        FileNotFoundError: none of the candidates has both (lists them).
    """
    root = Path(root)
    tried = [root / c if c != "." else root for c in VOC_CANDIDATES]
    for folder in tried:
        if (folder / "JPEGImages").is_dir() and (folder / "ImageSets" / "Segmentation").is_dir():
            return folder
    raise FileNotFoundError(
        f"no PASCAL VOC layout under {root}: looked for JPEGImages/ and ImageSets/Segmentation/ in "
        f"{_looked(tried)} (root may be VOC2012, VOCdevkit or the folder holding VOCdevkit)"
    )


def voc_augmented(voc: Path) -> tuple[Path, Path]:
    """SBD's ``train_aug`` list file and ``SegmentationClassAug`` folder for the VOC folder ``voc``.

    Raises:
        FileNotFoundError: either piece is missing (lists the paths looked at).
    """
    lists = [voc / p for p in AUG_LISTS]
    masks = [voc / "SegmentationClassAug", voc.parent / "SegmentationClassAug"]
    found_list = next((p for p in lists if p.is_file()), None)
    found_masks = next((p for p in masks if p.is_dir()), None)
    if found_list is None:
        raise FileNotFoundError(f"augmented=True needs SBD's train_aug list: looked for {_looked(lists)}")
    if found_masks is None:
        raise FileNotFoundError(f"augmented=True needs SBD's masks: looked for {_looked(masks)}")
    return found_list, found_masks


def cityscapes_root(root: str | Path) -> Path:
    """``root`` itself, or its ``cityscapes/`` sub-folder, whichever holds ``leftImg8bit/``.

    Raises:
        FileNotFoundError: neither does (lists both).
    """
    root = Path(root)
    tried = [root, root / "cityscapes"]
    for folder in tried:
        if (folder / "leftImg8bit").is_dir():
            return folder
    raise FileNotFoundError(
        f"no Cityscapes layout under {root}: looked for {_looked([t / 'leftImg8bit' for t in tried])} "
        "(unpack leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into root)"
    )
