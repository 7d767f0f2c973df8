"""Pictures people can read (issue 27): detection drawings enlarged with legible labels,
segmentation pictures with a class legend, classification predictions as a CSV."""
from __future__ import annotations

from pathlib import Path

import torch

from tasks.classification.predictions import write_rows
from tasks.detection.predictions import GROUND_TRUTH_COLOR, MIN_DRAWN_SIDE, draw, draw_scale, label_font
from tasks.segmentation.labels import DIGITS_VOC_CLASSES
from tasks.segmentation.visualize import legend_entries


def test_small_detection_images_are_drawn_three_times_larger() -> None:
    assert (draw_scale(96, 96), draw_scale(48, 64), draw_scale(640, 480), MIN_DRAWN_SIDE) == (3, 5, 1, 288)
    image = torch.zeros(3, 96, 96)
    no_detections = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    canvas = draw(image, no_detections, {}, target={"boxes": torch.tensor([[10.0, 20.0, 40.0, 50.0]])})
    assert canvas.shape == (3, 288, 288) and canvas.dtype == torch.uint8
    assert tuple(canvas[:, 60, 45].tolist()) == GROUND_TRUTH_COLOR  # the box's top edge at 3 x (20, 15)
    assert canvas[:, 60, 20].sum() == 0  # left of the box: the (black) image
    assert label_font() is not None and label_font().endswith(".ttf")  # labels in a TrueType font, not PIL's 6 px bitmap


def test_detection_labels_sit_on_a_filled_tag() -> None:
    image = torch.zeros(3, 96, 96)
    out = {"boxes": torch.tensor([[10.0, 10.0, 80.0, 80.0]]), "labels": torch.tensor([3]), "scores": torch.tensor([0.9])}
    canvas = draw(image, out, {3: "digit2"})
    tag = canvas[:, 33:45, 33:80]  # inside the box, below its top-left corner: the label's tag
    assert (tag.sum(0) > 0).float().mean() > 0.5  # mostly filled, not 1-px text on the image


def test_segmentation_legend_names_the_classes_present() -> None:
    target = torch.tensor([[0, 4, 255], [0, 4, 4]])
    pred = torch.tensor([[0, 4, 9], [0, 0, 4]])
    names = [name for name, _ in legend_entries([target, pred], DIGITS_VOC_CLASSES)]
    assert names == ["background", "digit3", "digit8", "not scored (255)"]
    assert [name for name, _ in legend_entries([pred], None)] == ["class 0", "class 4", "class 9"]


def test_classification_predictions_csv(tmp_path: Path) -> None:
    class Folder:
        classes = ["cat", "dog"]
        samples = [("a.png", 0), ("b.png", 1), ("c.png", 1)]

    path = write_rows([(2, 1, 0.75), (0, 0, 0.5)], tmp_path / "classes.csv", Folder())
    assert path.read_text().splitlines() == ["index,file,class,name,probability", "0,a.png,0,cat,0.5000", "2,c.png,1,dog,0.7500"]
