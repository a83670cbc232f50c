"""Classification metrics from a confusion matrix (NumPy only, so the ONNX evaluator shares them)."""
from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(num_classes * np.asarray(labels) + np.asarray(predictions),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(cm: np.ndarray, classes: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class precision/recall/F1 (a class never predicted has precision 0)."""
    tp = np.diag(cm).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / cm.sum(axis=0))
        recall = np.nan_to_num(tp / cm.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    report = {"accuracy": float(tp.sum() / max(cm.sum(), 1)), "macro_f1": float(f1.mean())}
    for i, c in enumerate(classes):
        report.update({f"precision_{c}": float(precision[i]), f"recall_{c}": float(recall[i]), f"f1_{c}": float(f1[i])})
    return report


DARK_LUMINANCE = 80  # mean 8-bit luma under which an image counts as a night shot


def dark_mask(images: np.ndarray) -> np.ndarray:
    """Night shots among uint8 (N, 3, H, W) images: mean Rec.601 luma below ``DARK_LUMINANCE``."""
    luma = np.tensordot(np.asarray(images, dtype=np.float32), np.array([0.299, 0.587, 0.114], np.float32), axes=([1], [0]))
    return luma.mean(axis=(1, 2)) < DARK_LUMINANCE


def accuracy_by_lighting(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Accuracy on dark (night) and bright test images: the tail split's domain shift, measured."""
    dark = dark_mask(images)
    correct = np.asarray(predictions) == np.asarray(labels)
    out = {"dark_count": float(dark.sum())}
    for name, mask in (("dark", dark), ("bright", ~dark)):
        if mask.any():
            out[f"accuracy_{name}"] = float(correct[mask].mean())
    return out


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Top-label confidence in ``bins`` equal-width bins: per bin its count, mean confidence and accuracy."""
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == np.asarray(labels)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [{"lower": b / bins, "upper": (b + 1) / bins, "count": int((which == b).sum()),
             "confidence": float(confidence[which == b].mean()) if (which == b).any() else float("nan"),
             "accuracy": float(correct[which == b].mean()) if (which == b).any() else float("nan")}
            for b in range(bins)]


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al., 2017): the count-weighted mean |accuracy - confidence| over confidence bins."""
    table = [b for b in reliability_bins(probabilities, labels, bins) if b["count"]]
    total = sum(b["count"] for b in table)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table) / max(total, 1))
