"""COCOeval wrapper: label -> category mapping, empty results, subsets, DDP gathering."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tasks.detection import COCODataModule, COCOEvaluator
from tasks.detection.evaluator import METRICS


def _perfect(targets, score: float = 1.0, label_shift: int = 0):
    return [
        {"boxes": t["boxes"], "labels": t["labels"] + label_shift, "scores": torch.full((len(t["boxes"]),), score)}
        for t in targets
    ]


def _val(tiny_coco) -> COCODataModule:
    dm = COCODataModule(root=str(tiny_coco), batch_size=4)
    dm.setup("validate")
    return dm


def test_non_contiguous_labels_round_trip_to_category_ids(tiny_coco) -> None:
    dm = _val(tiny_coco)
    assert dm.label_to_cat_id == {d + 1: 1 + 2 * d for d in range(10)}
    ev = COCOEvaluator(dm.val_coco, dm.label_to_cat_id)
    n_boxes = 0
    for _, targets in dm.val_dataloader():
        ev.update(_perfect(targets), targets)
        n_boxes += sum(len(t["boxes"]) for t in targets)
    assert n_boxes > 0
    result = ev.compute()
    assert set(result) == set(METRICS)
    assert result["mAP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)
    # the same boxes under the wrong category (label + 1 -> next digit's id) score low
    ev.reset()
    for _, targets in dm.val_dataloader():
        wrong = [{**o, "labels": torch.where(o["labels"] < 10, o["labels"] + 1, o["labels"] - 1)} for o in _perfect(targets)]
        ev.update(wrong, targets)
    assert ev.compute()["mAP"] < 0.5


def test_unmapped_label_is_an_error(tiny_coco) -> None:
    dm = _val(tiny_coco)
    ev = COCOEvaluator(dm.val_coco, dm.label_to_cat_id)
    _, targets = next(iter(dm.val_dataloader()))
    with pytest.raises(ValueError, match="predicted label 11"):
        ev.update([{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([11]), "scores": torch.tensor([0.9])}],
                  targets[:1])
    with pytest.raises(ValueError, match="category ids"):
        COCOEvaluator(dm.val_coco, {1: 2})  # 2 is not a digits-COCO id


def test_empty_detections_give_zero(tiny_coco) -> None:
    dm = _val(tiny_coco)
    ev = COCOEvaluator(dm.val_coco, dm.label_to_cat_id)
    assert ev.compute() == dict.fromkeys(METRICS, 0.0)  # nothing seen at all
    for _, targets in dm.val_dataloader():
        empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}]
        ev.update(empty * len(targets), targets)
    assert ev.compute()["mAP"] == 0.0


def test_only_evaluated_images_are_scored(tiny_coco) -> None:
    dm = _val(tiny_coco)
    ev = COCOEvaluator(dm.val_coco, dm.label_to_cat_id)
    targets = [t for t in dm.val_set if len(t[1]["boxes"])][0][1]
    ev.update(_perfect([targets]), [targets])  # one image of four: perfect on that subset
    assert ev.compute()["mAP"] == pytest.approx(1.0)


def _rank_detections(dm: COCODataModule, rank: int, world: int):
    """Rank r sees images r, r+world, ... plus image 0 (as a sampler's padding duplicate).

    Rank 0 predicts perfectly, rank 1 predicts nothing: only a gathered evaluation
    sees both halves.
    """
    out = []
    for i in range(len(dm.val_set)):
        if i % world == rank or i == 0:
            t = dm.val_set[i][1]
            dets = _perfect([t]) if rank == 0 else [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}]
            out.append((dets, [t]))
    return out


def _ddp_worker(rank: int, world: int, port: int, root: str, queue) -> None:
    torch.set_num_threads(1)  # forked child: keep OpenMP out of it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = _val(root)
        ev = COCOEvaluator(dm.val_coco, dm.label_to_cat_id)
        for dets, t in _rank_detections(dm, rank, world):
            ev.update(dets, t)
        queue.put((rank, ev.compute()))
    finally:
        dist.destroy_process_group()


def test_ddp_gathers_to_one_result(tiny_coco) -> None:
    dm = _val(tiny_coco)
    reference = COCOEvaluator(dm.val_coco, dm.label_to_cat_id)
    for rank in (1, 0):  # rank 0 last: its copy of the duplicated image wins, as in the merge
        for dets, t in _rank_detections(dm, rank, 2):
            reference.update(dets, t)
    expected = reference.compute()
    rank0_alone = COCOEvaluator(dm.val_coco, dm.label_to_cat_id)
    for dets, t in _rank_detections(dm, 0, 2):
        rank0_alone.update(dets, t)
    assert rank0_alone.compute()["mAP"] != pytest.approx(expected["mAP"])  # the test can tell them apart

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # no re-import of torch: seconds, not tens of seconds
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tiny_coco), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == expected
