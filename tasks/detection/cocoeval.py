"""COCO box AP with ``pycocotools``' per-image matching, run in several processes.

``COCOeval.evaluate`` matches detections to ground truth image by image, in pure Python:
about 40 ms per image with 100 detections, so over a minute for COCO's 5,000 validation
images. Images are independent, so :func:`evaluate` splits them into contiguous chunks,
forks one process per chunk, and has each return only what ``accumulate`` reads, per
(category, area range, max detections): the detections' scores, matched and ignored flags
(booleans) and the number of counted ground-truth boxes. :func:`accumulate` is
``COCOeval.accumulate`` on those arrays: chunks are concatenated in image order and sorted
with the same stable sort, so the numbers equal pycocotools' own (tested); ``summarize``
then prints and fills ``stats`` as usual.
"""
from __future__ import annotations

import contextlib
import copy
import io
import multiprocessing as mp
import os

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

Part = dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray, int]]
IMAGES_PER_PROCESS = 250  # below this, a fork costs more than it saves
_shared: tuple[COCO, np.ndarray, Params, list[np.ndarray]] | None = None


def default_workers() -> int:
    """Processes for evaluation: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _params(gt: COCO, image_ids: list[int]) -> Params:
    """``COCOeval``'s bbox parameters for ``image_ids``, normalised as ``evaluate`` does."""
    p = COCOeval(gt, iouType="bbox").params
    p.imgIds = list(np.unique(image_ids))
    p.catIds = list(np.unique(p.catIds))
    p.maxDets = sorted(p.maxDets)
    return p


def partial_evaluation(gt: COCO, results: np.ndarray, params: Params, image_ids: np.ndarray) -> Part:
    """Match the detections of ``image_ids`` (rows ``[image_id, x, y, w, h, score, category_id]``)."""
    rows = results[np.isin(results[:, 0], image_ids)]
    if not len(rows):
        return {}
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(rows), iouType="bbox")
        ev.params = copy.deepcopy(params)
        ev.params.imgIds = [int(i) for i in image_ids]
        ev.evaluate()
    p, n_img, n_area = ev.params, len(ev.params.imgIds), len(ev.params.areaRng)
    part: Part = {}
    for k in range(len(p.catIds)):
        for a in range(n_area):
            start = (k * n_area + a) * n_img
            entries = [e for e in ev.evalImgs[start:start + n_img] if e is not None]
            if not entries:
                continue
            for m, max_det in enumerate(p.maxDets):
                part[k, a, m] = (
                    np.concatenate([e["dtScores"][:max_det] for e in entries]),
                    np.concatenate([e["dtMatches"][:, :max_det] for e in entries], axis=1).astype(bool),
                    np.concatenate([e["dtIgnore"][:, :max_det] for e in entries], axis=1).astype(bool),
                    int(sum(np.count_nonzero(e["gtIgnore"] == 0) for e in entries)),
                )
    return part


def _child(index: int) -> Part:
    gt, results, params, chunks = _shared  # type: ignore[misc]
    return partial_evaluation(gt, results, params, chunks[index])


def accumulate(params: Params, parts: list[Part]) -> dict:
    """``COCOeval.accumulate`` over the chunks' arrays (chunks in image order)."""
    T, R = len(params.iouThrs), len(params.recThrs)
    K, A, M = len(params.catIds), len(params.areaRng), len(params.maxDets)
    precision, recall, scores = -np.ones((T, R, K, A, M)), -np.ones((T, K, A, M)), -np.ones((T, R, K, A, M))
    for key in sorted({key for part in parts for key in part}):
        k, a, m = key
        pieces = [part[key] for part in parts if key in part]
        npig = sum(piece[3] for piece in pieces)
        if npig == 0:
            continue
        dt_scores = np.concatenate([piece[0] for piece in pieces])
        order = np.argsort(-dt_scores, kind="mergesort")
        sorted_scores = dt_scores[order]
        dtm = np.concatenate([piece[1] for piece in pieces], axis=1)[:, order]
        dt_ig = np.concatenate([piece[2] for piece in pieces], axis=1)[:, order]
        tp_sum = np.cumsum(dtm & ~dt_ig, axis=1).astype(float)
        fp_sum = np.cumsum(~dtm & ~dt_ig, axis=1).astype(float)
        for t in range(T):
            tp, fp = tp_sum[t], fp_sum[t]
            nd = len(tp)
            rc = tp / npig
            pr = tp / (fp + tp + np.spacing(1))
            recall[t, k, a, m] = rc[-1] if nd else 0
            pr = np.maximum.accumulate(pr[::-1])[::-1]  # pycocotools' right-to-left running max
            inds = np.searchsorted(rc, params.recThrs, side="left")
            valid = inds < nd
            q, ss = np.zeros(R), np.zeros(R)
            q[valid], ss[valid] = pr[inds[valid]], sorted_scores[inds[valid]]
            precision[t, :, k, a, m], scores[t, :, k, a, m] = q, ss
    return {"params": params, "counts": [T, R, K, A, M], "precision": precision, "recall": recall, "scores": scores}


def evaluate(gt: COCO, results: np.ndarray, image_ids: list[int], *, workers: int = 1) -> tuple[np.ndarray, str]:
    """COCO box AP of ``results`` on ``image_ids``: ``(COCOeval.stats, the printed summary)``.

    Args:
        gt: ground truth.
        results: ``[N, 7]`` rows ``[image_id, x, y, w, h, score, category_id]`` (COCO's numpy form).
        image_ids: the images that were evaluated (images without detections count as misses).
        workers: processes to split the images over (forked; 1 = this process only).
    """
    global _shared
    params = _params(gt, image_ids)
    ids = np.asarray(params.imgIds, dtype=np.int64)
    n = max(1, min(workers, len(ids) // IMAGES_PER_PROCESS))
    chunks = np.array_split(ids, n)
    if n == 1:
        parts = [partial_evaluation(gt, results, params, ids)]
    else:
        _shared = (gt, results, params, chunks)
        try:
            with mp.get_context("fork").Pool(n) as pool:
                parts = pool.map(_child, range(n))
        finally:
            _shared = None
    ev = COCOeval(gt, iouType="bbox")
    ev.params = params
    ev.eval = accumulate(params, parts)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64), buf.getvalue()
