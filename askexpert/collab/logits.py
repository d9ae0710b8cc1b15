"""Run each model once per split and keep its logits on disk (`RUN/logits/<name>_<split>.safetensors`), and the one
batched-inference loop (`batched_logits`) that every command running a model over many images uses.

Everything downstream (gates, thresholds, baselines, other profiles) is computed from these tensors, so
`evaluate` with another gate or profile costs seconds. A cache file is reused only if it was computed from
a checkpoint with the same content (SHA-256) and the same data split. A cache shared by many runs (an
ablation's store) names its files `<name>-<checkpoint hash>_<split>.safetensors`, one per checkpoint.

The files are safetensors (two tensors, `logits` and `labels`, plus the key and the model's description as
JSON in the header): a run folder someone hands over cannot run code through its cache. Caches of earlier
versions (`*.pt`, pickles) are never opened: the logits are recomputed once, with a one-line note.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from askexpert.files.atomic import atomic_write_bytes
from askexpert.files.checkpoints import check_same_classes
from askexpert.files.hashing import file_sha256
from askexpert.modules.loading import load_classifier
from datamodules.datamodule import ImageDataModule

CACHE_VERSION = 2  # 1: pickled .pt files (not read any more)
SUFFIX = ".safetensors"
HEADER = "askexpert"  # the safetensors metadata entry holding {"key": ..., "meta": ...} as JSON
_noted_old_caches: set[str] = set()


def _checkpoint_key(path: str) -> dict:
    """The checkpoint's content (not its path or time), so a moved or copied run keeps its cache."""
    return {"sha256": file_sha256(path), "size": os.path.getsize(path)}


def _data_key(datamodule: ImageDataModule, split: str) -> dict:
    h = datamodule.hparams
    keys = ("source", "root", "image_size", "val_fraction", "seed", "synthetic_seed")
    key = {k: h.get(k) for k in keys}
    if h.source == "synthetic":
        key.update(train=h.synthetic_train_per_class, test=h.synthetic_test_per_class)
    if h.get("stored_size") is not None:  # only when set: the keys of caches made before it existed stay valid
        key["stored_size"] = h.stored_size
    key["split"], key["size"] = split, len(datamodule.tensors(split)[1])
    return key


def describe_model(model) -> dict:
    """What a report says about a model: architecture, size, classes, expert settings."""
    h = model.hparams
    info = {
        "class": type(model).__name__,
        "model_name": h.model_name,
        "num_classes": int(h.num_classes),
        "num_outputs": int(model.num_outputs),
        "image_size": int(h.get("image_size", 32)),
        "params": sum(p.numel() for p in model.net.parameters()),
        "class_names": list(h.class_names) if h.get("class_names") else None,
    }
    if "subset" in h:
        info.update(
            subset=sorted(int(c) for c in h.subset),
            expert_index=int(h.get("expert_index", 0)),
            init=h.get("init"),
            other_output=bool(h.get("other_output", False)),
        )
    return info


def in_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """`images` in consecutive slices of `batch_size` (the last one shorter)."""
    return (images[i : i + batch_size] for i in range(0, len(images), batch_size))


@torch.no_grad()
def batched_logits(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor]
) -> torch.Tensor:
    """(N, K) float32 logits on the CPU of `model` over `batches`, concatenated in order.

    `model` is a torch module (each batch is moved to the module's device) or any function from a batch to logits
    (an ONNX Runtime session's). No batch at all gives (0, K) for a module: a split may be empty.
    """
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else None
    outputs = [(model(batch) if device is None else model(batch.to(device))).float().cpu() for batch in batches]
    return torch.cat(outputs) if outputs else torch.empty(0, model.num_outputs)


def compute_logits(model, datamodule: ImageDataModule, split: str, label: str = "") -> torch.Tensor:
    """A model's logits on one split of the data, with a progress bar named `label` (what the cache stores)."""
    loader = tqdm(datamodule.dataloader(split), desc=f"{label} {split}".strip(), leave=False, dynamic_ncols=True)
    return batched_logits(model, (images for images, _ in loader))


def cached_logits(
    name: str,
    checkpoint: str,
    datamodule: ImageDataModule,
    splits: tuple[str, ...],
    cache_dir: str,
    by_checkpoint: bool = False,
) -> dict:
    """{"meta": describe_model(...), "labels": {split: (N,)}, "logits": {split: (N, K)}} for `checkpoint`.

    Loads the model only when some split is not cached yet. `by_checkpoint` puts the checkpoint's hash in
    the file names, for a cache that many runs share (an ablation's), where one name has many checkpoints.
    """
    key = {"version": CACHE_VERSION, "checkpoint": _checkpoint_key(checkpoint)}
    if by_checkpoint:
        name = f"{name}-{key['checkpoint']['sha256'][:16]}"
    result: dict = {"logits": {}, "labels": {}}
    model = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for split in splits:
        path = os.path.join(cache_dir, f"{name}_{split}{SUFFIX}")
        # compared as JSON, the form it is stored in (tuples come back as lists)
        split_key = json.loads(json.dumps({**key, "data": _data_key(datamodule, split)}))
        saved = read_cache_file(path)
        if saved is not None and saved["key"] == split_key:
            result["logits"][split], result["labels"][split] = saved["logits"], saved["labels"]
            result["meta"] = saved["meta"]
            continue
        _note_old_cache(cache_dir, os.path.join(cache_dir, f"{name}_{split}.pt"))
        if model is None:
            model = load_classifier(checkpoint, map_location=device)
            check_same_classes(model, datamodule, f"{name} ({checkpoint})")
            result["meta"] = describe_model(model)
        logits = compute_logits(model, datamodule, split, name)
        labels = datamodule.tensors(split)[1].clone()
        result["logits"][split], result["labels"][split] = logits, labels
        os.makedirs(cache_dir, exist_ok=True)
        header = json.dumps({"key": split_key, "meta": result["meta"]})
        tensors = {"logits": logits.contiguous(), "labels": labels.contiguous()}
        atomic_write_bytes(path, safetensors_bytes(tensors, metadata={HEADER: header}))
    return result


def read_cache_file(path: str) -> dict | None:
    """{"key", "meta", "logits", "labels"} of one cache file; None when it is missing, damaged or not ours.

    safetensors reads a JSON header and raw tensor bytes: nothing in the file is ever executed.
    """
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            header = json.loads((handle.metadata() or {})[HEADER])
            logits, labels = handle.get_tensor("logits"), handle.get_tensor("labels")
        saved = {"key": header["key"], "meta": header["meta"], "logits": logits, "labels": labels}
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    if logits.dim() != 2 or labels.dim() != 1 or len(logits) != len(labels) or not isinstance(saved["meta"], dict):
        return None
    return saved


def _note_old_cache(cache_dir: str, old_file: str) -> None:
    """One line per cache folder when its logits are recomputed because they are in the old pickle format."""
    if cache_dir in _noted_old_caches or not os.path.isfile(old_file):
        return
    _noted_old_caches.add(cache_dir)
    print(
        f"note: {cache_dir} holds logits cached by an earlier askexpert as pickles (*.pt), which are never "
        f"loaded (a pickle can run code); recomputing them as {SUFFIX} files (the *.pt files can be deleted)",
        file=sys.stderr,
        flush=True,
    )
