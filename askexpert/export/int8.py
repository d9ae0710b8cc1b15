"""Optional int8 copies of an export's models (`export --int8 true`), and what they cost in agreement and accuracy.

ONNX Runtime's dynamic quantization (`quantize_dynamic`): the weights of MatMul/Gemm become int8, activations
are quantized on the fly. It needs no calibration data, suits transformers on CPU, and makes the files about a
quarter of the size. Unlike the fp32 files, an int8 file has no agreement requirement (the issue says so): its
figures are recorded in the manifest and printed, for a user to decide, and `serve`/`edge --precision int8`
load it.

Figures, each against the run's test images:
- per model: the share with the same top-1 as PyTorch, the largest logit difference, and accuracy fp32 (ONNX)
  vs int8 (the generalist on every image; an expert on the images of its classes);
- for the system: routing decisions that differ from PyTorch's (the expert, and the second expert when the export
  asks one), and the system's accuracy (gate, top-k router and fusion at the export's operating point, as `route`
  answers) with every model fp32 vs every model int8.
"""

from __future__ import annotations

import logging
import os
from functools import partial

import torch

from askexpert.collab.routing import NO_EXPERT, EdgeDecision, fused_answers
from askexpert.errors import UserError


def quantize(fp32_path: str, int8_path: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the model first is logged on the root logger
    try:
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
    except Exception as err:  # noqa: BLE001 (a graph ONNX Runtime's quantizer cannot handle: say which, in one line)
        name = os.path.basename(fp32_path)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"int8 quantization of {name} failed ({message}); export without --int8") from None
    finally:
        root.setLevel(level)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if not len(labels):
        return float("nan")
    return float((logits.argmax(-1) == labels).double().mean())


def model_figures(torch_logits, fp32_logits, int8_logits, labels, inside=None) -> dict:
    """Agreement of the int8 file with PyTorch, and accuracy fp32 -> int8 (on `inside` images when given)."""
    same = (torch_logits.argmax(-1) == int8_logits.argmax(-1)).float()
    rows = torch.ones(len(labels), dtype=torch.bool) if inside is None else inside
    fp32_acc, int8_acc = accuracy(fp32_logits[rows], labels[rows]), accuracy(int8_logits[rows], labels[rows])
    return {
        "images": len(labels),
        "top1_agreement": float(same.mean()) if len(labels) else 1.0,
        "max_abs_logit_diff": float((torch_logits - int8_logits).abs().max()) if len(labels) else 0.0,
        "accuracy_images": int(rows.sum()),
        "accuracy_fp32": fp32_acc,
        "accuracy_int8": int8_acc,
        "accuracy_change_points": 100 * (int8_acc - fp32_acc),
    }


def _rows_of(logits: dict[str, torch.Tensor], expert: int, rows: torch.Tensor) -> torch.Tensor:
    return logits[f"expert_{expert}"][rows]


def system_answers(
    logits: dict[str, torch.Tensor],
    decision: EdgeDecision,
    routes: torch.Tensor,
    fusion: str,
    second: tuple[torch.Tensor, str] | None = None,
):
    """The system's answer per image: the generalist's, or the fusion with the expert it was routed to (and with
    the second expert, for `second` = (second routes, two-expert fusion))."""
    pair = None if second is None else (second[0], decision.mass, second[1])
    return fused_answers(decision.probs, routes, partial(_rows_of, logits), fusion, second=pair)


def system_figures(
    fp32: dict, int8: dict, torch_routes, decisions, threshold: float, fusion: str, labels, pair=None, torch_second=None
) -> dict:
    """The int8 system against PyTorch's routing and the fp32 (ONNX) system's accuracy. `decisions`: the fp32 and
    the int8 generalist's `EdgeDecision`. With `pair` ({"margin", "fusion"}: a second expert is asked),
    `torch_second` are PyTorch's second routes, and an image whose second expert differs is a flip too."""
    fp32_decision, int8_decision = decisions
    fp32_routes, int8_routes = fp32_decision.routes(threshold), int8_decision.routes(threshold)
    flipped = torch_routes != int8_routes
    fp32_second = int8_second = None
    if pair is not None:
        fp32_second = (fp32_decision.second_routes(threshold, pair["margin"]), pair["fusion"])
        int8_second = (int8_decision.second_routes(threshold, pair["margin"]), pair["fusion"])
        flipped |= torch_second != int8_second[0]
    fp32_answers = system_answers(fp32, fp32_decision, fp32_routes, fusion, fp32_second)
    int8_answers = system_answers(int8, int8_decision, int8_routes, fusion, int8_second)
    fp32_acc = float((fp32_answers == labels).double().mean())
    int8_acc = float((int8_answers == labels).double().mean())
    return {
        "images": len(labels),
        "routing_flips": int(flipped.sum()),
        "offloaded_int8": int((int8_routes != NO_EXPERT).sum()),
        "system_accuracy_fp32": fp32_acc,
        "system_accuracy_int8": int8_acc,
        "system_accuracy_change_points": 100 * (int8_acc - fp32_acc),
    }
