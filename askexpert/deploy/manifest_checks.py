"""An export's manifest checked by type, range and consistency, once, where `load_bundle` reads it.

What the server and the edge client use afterwards without a second look: every class id inside the classes,
one name per class, an expert model per subset (`expert_0` ... in partition order: the edge asks `expert_{e}`),
output widths that match the classes, one image size for every model, an operating point the router can apply
(threshold in [0, 1], temperature finite and above 0, a known gate and fusion, top-k within the classes) and file
names that stay inside the export folder.

The router's names (gates, fusions) are kept here as data because this module is torch-free and the router is
not; tests/test_bad_manifests.py checks that they are the router's own.
"""

from __future__ import annotations

import os
import re

from askexpert.files.fields import BadField, choice, field, flag, mapping, number, sequence, text, whole

GATES = ("max_prob", "margin", "entropy")
FUSIONS = ("expert", "product", "mean")
SECOND_FUSIONS = ("mass", "expert", "product", "mean")
SHA256 = re.compile(r"[0-9a-f]{64}")


def check_manifest(manifest) -> None:
    """Raise BadField for the first field of `manifest` (format 1, already parsed JSON) that is out of line."""
    manifest = mapping(manifest, "the manifest")
    models = mapping(field(manifest, "models", ""), "models")
    generalist = field(models, "generalist", "models.")
    num_classes = _width(generalist, "models.generalist")  # the classes are what the generalist answers
    names = sequence(field(manifest, "class_names", ""), "class_names")
    if len(names) != num_classes:
        raise BadField(
            f"class_names must name the {num_classes} classes of models.generalist.output.shape, got {len(names)} names"
        )
    _class_names(names)
    partition = _partition(mapping(field(manifest, "partition", ""), "partition"), num_classes)
    expected = ["generalist", *(f"expert_{e}" for e in range(len(partition)))]
    if sorted(models) != sorted(expected):
        raise BadField(
            f"models must be {', '.join(expected)} (a generalist and one expert per partition subset), "
            f"got {', '.join(map(str, models))}"
        )
    stored = _model(generalist, "models.generalist", num_classes)
    for e, classes in enumerate(partition):
        name = f"expert_{e}"
        entry = mapping(models[name], f"models.{name}")
        other = flag(entry.get("other_output", False), f"models.{name}.other_output")
        if _model(entry, f"models.{name}", num_classes, other) != stored:
            raise BadField(f"models.{name}.input.shape must take {stored} x {stored} images, as the generalist does")
        if "subset" in entry:
            subset = sequence(entry["subset"], f"models.{name}.subset")
            for i, c in enumerate(subset):
                whole(c, f"models.{name}.subset[{i}]", 0, num_classes - 1)
            if sorted(subset) != sorted(classes):
                raise BadField(f"models.{name}.subset must be partition.experts[{e}]'s classes")
    _operating_point(mapping(field(manifest, "operating_point", ""), "operating_point"), num_classes)
    # what `adapt --export` and the model card open (export has always written it)
    verification = mapping(field(manifest, "verification", ""), "verification")
    for key in ("routing", "int8"):
        if key in verification:
            mapping(verification[key], f"verification.{key}")
    if manifest.get("adapted") is not None:
        mapping(manifest["adapted"], "adapted")


def _class_names(names: list) -> None:
    for i, name in enumerate(names):
        text(name, f"class_names[{i}]")
    if len(set(names)) != len(names):
        raise BadField("class_names must not name a class twice")


def _partition(partition: dict, num_classes: int) -> list[list[int]]:
    experts = sequence(field(partition, "experts", "partition."), "partition.experts", min_length=1)
    for e, classes in enumerate(experts):
        where = f"partition.experts[{e}]"
        for i, c in enumerate(sequence(classes, where, min_length=1)):
            whole(c, f"{where}[{i}] (a class id of {num_classes} classes)", 0, num_classes - 1)
        if len(set(classes)) != len(classes):
            raise BadField(f"{where} must not list a class twice")
    count = partition.get("num_experts", len(experts))
    if whole(count, "partition.num_experts", 1) != len(experts):
        raise BadField(f"partition.num_experts must be {len(experts)}, the subsets listed, got {count}")
    return experts


def _width(entry, where: str) -> int:
    """How many logits a model answers (its output shape's last dimension)."""
    output = mapping(field(mapping(entry, where), "output", f"{where}."), f"{where}.output")
    shape = sequence(field(output, "shape", f"{where}.output."), f"{where}.output.shape", min_length=2)
    return whole(shape[-1], f"{where}.output.shape's width", 2)


def _model(entry: dict, where: str, num_classes: int, other: bool = False) -> int:
    """Check one model's entry (and its int8 copy's): its files, its input, one logit per class (and one for
    "other" when `other`); its stored image size."""
    _file(entry, where)
    if "int8" in entry:
        _file(mapping(entry["int8"], f"{where}.int8"), f"{where}.int8")
    model_input = mapping(field(entry, "input", f"{where}."), f"{where}.input")
    text(field(model_input, "name", f"{where}.input."), f"{where}.input.name")
    shape = sequence(field(model_input, "shape", f"{where}.input."), f"{where}.input.shape")
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
        raise BadField(f"{where}.input.shape must be [batch, 3, size, size], got {shape!r}")
    size = whole(shape[3], f"{where}.input.shape's image size", 1)
    width = _width(entry, where)
    if width != num_classes + other:
        what = f"{num_classes} classes" + (" and other" if other else "")
        raise BadField(f"{where}.output.shape must end in {num_classes + other} (one logit per {what}), got {width}")
    if "model_image_size" in entry:
        whole(entry["model_image_size"], f"{where}.model_image_size", 1)
    return size


def _file(entry: dict, where: str) -> None:
    name = text(field(entry, "file", f"{where}."), f"{where}.file")
    if os.path.basename(name) != name or name in (".", ".."):
        raise BadField(f"{where}.file must be a file name inside the export folder, got {name!r}")
    if not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"]):
        raise BadField(f"{where}.sha256 must be 64 lowercase hex digits")


def _operating_point(op: dict, num_classes: int) -> None:
    number(field(op, "threshold", "operating_point."), "operating_point.threshold", 0.0, 1.0)
    temperature = field(op, "temperature_value", "operating_point.")
    number(temperature, "operating_point.temperature_value", 0.0, above=True)
    choice(field(op, "gate", "operating_point."), "operating_point.gate", GATES)
    whole(field(op, "top_k", "operating_point."), f"operating_point.top_k ({num_classes} classes)", 1, num_classes)
    choice(field(op, "fusion", "operating_point."), "operating_point.fusion", FUSIONS)
    pair = op.get("second_expert")  # absent in one-expert exports (and in those made before it)
    if pair is not None:
        pair = mapping(pair, "operating_point.second_expert")
        number(field(pair, "margin", "operating_point.second_expert."), "operating_point.second_expert.margin", 0, 1)
        fusion = field(pair, "fusion", "operating_point.second_expert.")
        choice(fusion, "operating_point.second_expert.fusion", SECOND_FUSIONS)


__all__ = ["BadField", "check_manifest"]
