"""Sanity findings: warnings that keep a degenerate run from being read as a result.

A run whose base model or experts diverged still produces a complete report: the operating point falls back
to "offload nothing" and the headline's **askexpert** row is the generalist alone. These checks read the
report dictionary (`collab/evaluation.py`), nothing else, and return findings — warnings, not errors: the
report is still written, with the findings at its top (stdout, report.md, report.json).

The checks and their thresholds (docs/collaborative.md, "Sanity findings"):

- `near_chance`: a model whose accuracy is within `CHANCE_STANDARD_ERRORS` (2) binomial standard errors of
  chance, or below it: accuracy <= p0 + 2 * sqrt(p0 * (1 - p0) / n), the standard error taken at chance
  (the null hypothesis "this model guesses"). A model that only guesses lands above this limit about 2.3 %
  of the time (one-sided, normal approximation), so one at or below it cannot be told from guessing.
  - generalist and base model: test accuracy over all C classes, p0 = 1 / C, n = test images.
  - each expert (specialised and static): accuracy on the test images of its own classes S, p0 = 1 / |S|,
    n = those images (`subset_test_images`; reports without it: test images x |S| / C, the stand-in and
    CIFAR-100 test sets being balanced). 1 / |S| and not 1 / C, because a model that learnt only which
    classes are its own (a constant or uniform guess among them) already reaches 1 / |S| on those images,
    |S| times the all-class chance; and own classes, because that is an expert's job and what the router
    sends it. Its all-class accuracy is not checked: a static expert is built to be wrong outside S, and an
    expert clearly above 1 / |S| on its classes is above 1 / C over all of them anyway.
- `base_not_better`: the base model's test accuracy is not above the generalist's (difference <= 0).
- `expert_not_better`: an expert's accuracy on its own classes is not above the generalist's on the same
  images (difference <= 0).
  Neither comparison has a noise band: they are there to catch a model that diverged or never trained,
  which lands far below the generalist, not to test whether a small gain is significant. A band of 2
  standard errors of the difference would be about 1.3 points for the base model on the demo's 5 000 test
  images and about 3 points on an expert's 1 250, and would warn on healthy demo runs whose gains are small.
- `offload_nothing`: the selected operating point offloads at most `OFFLOAD_NOTHING_MAX` (1 %) of the test
  images. Only offloaded answers can differ from the generalist's, so the system's accuracy is then within
  1 point of the generalist alone: the **askexpert** row measures the generalist, not the collaboration.
- `offload_everything`: it offloads at least `OFFLOAD_EVERYTHING_MIN` (99 %). The edge then keeps at most
  1 % of the images, so the generalist's gate changes at most 1 point of accuracy: the row measures the
  experts answering everything (a CPU demo run at 99.5 % was one), not a trade-off between the two.
- `not_measured`: an accuracy or offload share that is missing, not a number (an expert none of whose
  classes is in the test split has NaN) or outside [0, 1]; the checks that need it are skipped.
- `no_test_images`: the test split is empty (or the class count is not positive): nothing is measured.
- `no_experts`: the report lists no experts, so nothing can be offloaded to.
"""

from __future__ import annotations

import math
from typing import Any

CHANCE_STANDARD_ERRORS = 2.0  # "near chance": within this many binomial standard errors of 1 / classes
OFFLOAD_NOTHING_MAX = 0.01  # an operating point offloading at most this share "offloads nothing"
OFFLOAD_EVERYTHING_MIN = 0.99  # and at least this share "offloads everything"

Finding = dict[str, str]


def finding(check: str, subject: str, message: str) -> Finding:
    """One finding: which check, about what (a report key or expert name), and one readable sentence."""
    return {"check": check, "subject": subject, "message": message}


def measured(value: Any) -> float | None:
    """`value` as a float when it is a real number in [0, 1] (an accuracy or a share), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def positive_count(value: Any) -> int | None:
    """`value` as an int when it is a positive whole number (an image or class count), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value) if value >= 1 and value == int(value) else None


def _pct(value: float, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f} %"


def _classes(count: int) -> str:
    return f"{count} class" if count == 1 else f"{count} classes"


def binomial_standard_error(p: float, n: int) -> float:
    """Standard error of an accuracy measured on `n` images when each is right with probability `p`."""
    return math.sqrt(p * (1.0 - p) / n)


def chance_limit(chance: float, images: int) -> float:
    """The highest accuracy that still counts as "near chance" on `images` test images."""
    return chance + CHANCE_STANDARD_ERRORS * binomial_standard_error(chance, images)


def not_measured(subject: str, label: str, what: str, value: Any) -> Finding:
    return finding(
        "not_measured", subject, f"{label}: {what} is {value!r}, not a number in [0, 1], so it could not be checked"
    )


def near_chance(subject: str, label: str, what: str, acc: float, classes: int, images: int) -> Finding | None:
    """A finding when `acc` (measured on `images` images of `classes` classes) cannot be told from guessing."""
    chance = 1.0 / classes
    limit = chance_limit(chance, images)
    if acc > limit:
        return None
    below = acc < chance - (limit - chance)
    where = "below chance" if below else f"within {CHANCE_STANDARD_ERRORS:g} binomial standard errors of chance"
    return finding(
        "near_chance",
        subject,
        f"{label}: {what} {_pct(acc)} is {where} ({_pct(chance)} for {_classes(classes)}, {images} images; "
        f"up to {_pct(limit)} counts as chance)",
    )


def expert_images(expert: dict, test_images: int | None, num_classes: int | None) -> int | None:
    """How many test images the expert's own-class accuracy was measured on (estimated for older reports)."""
    if "subset_test_images" in expert:
        return positive_count(expert["subset_test_images"])
    if test_images is None or num_classes is None:
        return None
    return positive_count(round(test_images * len(expert.get("classes") or []) / num_classes))


def expert_findings(expert: dict, test_images: int | None, num_classes: int | None) -> list[Finding]:
    """Near chance on its own classes, and not better than the generalist there."""
    name = str(expert.get("name", "?"))
    label = f"expert {name}"
    classes = len(expert.get("classes") or [])
    what = f"accuracy on its own {_classes(classes)}"
    own = measured(expert.get("subset_test_acc"))
    generalist = measured(expert.get("generalist_subset_test_acc"))
    out: list[Finding] = []
    if own is None:
        out.append(not_measured(name, label, what, expert.get("subset_test_acc")))
    else:
        images = expert_images(expert, test_images, num_classes)
        if classes and images:
            out.append(near_chance(name, label, what, own, classes, images))
    if generalist is None:
        raw = expert.get("generalist_subset_test_acc")
        out.append(not_measured(name, label, "the generalist's accuracy on its classes", raw))
    elif own is not None and own <= generalist:
        out.append(
            finding(
                "expert_not_better",
                name,
                f"{label}: {what} {_pct(own)} is not better than the generalist's {_pct(generalist)} on the same "
                f"images ({100 * (own - generalist):+.2f} points)",
            )
        )
    return [f for f in out if f is not None]


def model_findings(report: dict, test_images: int | None, num_classes: int | None) -> list[Finding]:
    """Generalist and base model near chance, base not better than the generalist, then every expert."""
    out: list[Finding] = []
    accuracies: dict[str, float | None] = {}
    for key, label in (("generalist", "generalist"), ("base", "base model")):
        entry = report.get(key)
        if not entry and key == "base":
            continue  # a report without a base model: nothing to check
        raw = (entry or {}).get("test_acc")
        accuracies[key] = acc = measured(raw)
        if acc is None:
            out.append(not_measured(key, label, "test accuracy", raw))
        elif test_images and num_classes:
            out.append(near_chance(key, label, "test accuracy", acc, num_classes, test_images))
    base, generalist = accuracies.get("base"), accuracies.get("generalist")
    if base is not None and generalist is not None and base <= generalist:
        out.append(
            finding(
                "base_not_better",
                "base",
                f"base model: test accuracy {_pct(base)} is not better than the generalist's {_pct(generalist)} "
                f"({100 * (base - generalist):+.2f} points) although it is the larger all-class model (the edge "
                "medium and full offload rows are this model)",
            )
        )
    if not report.get("experts"):
        message = "experts: the report has none, so the askexpert row is the generalist alone"
        out.append(finding("no_experts", "experts", message))
    for expert in [*(report.get("experts") or []), *(report.get("static_experts") or [])]:
        out += expert_findings(expert, test_images, num_classes)
    return [f for f in out if f is not None]


def operating_point_findings(report: dict, test_images: int | None) -> list[Finding]:
    """The selected operating point offloading (almost) nothing or (almost) everything."""
    selected = report.get("selected") or {}
    raw = selected.get("offload_ratio")
    ratio = measured(raw)
    if ratio is None:
        return [not_measured("selected", "operating point", "offload share", raw)]
    threshold = selected.get("threshold")
    point = "operating point"
    if isinstance(threshold, int | float):
        point += f": threshold {threshold:.2f} (chosen on {selected.get('chosen_on', '?')})"
    images = f"the {test_images} test images" if test_images else "the test images"
    if ratio <= OFFLOAD_NOTHING_MAX:
        return [
            finding(
                "offload_nothing",
                "selected",
                f"{point} offloads {_pct(ratio, 1)} of {images} ({_pct(OFFLOAD_NOTHING_MAX, 0)} or less counts as "
                f"nothing), so the askexpert row is the generalist alone within {100 * ratio:.1f} points of accuracy",
            )
        ]
    if ratio >= OFFLOAD_EVERYTHING_MIN:
        return [
            finding(
                "offload_everything",
                "selected",
                f"{point} offloads {_pct(ratio, 1)} of {images} ({_pct(OFFLOAD_EVERYTHING_MIN, 0)} or more counts as "
                f"everything), so the generalist's gate decides at most {100 * (1 - ratio):.1f} points of accuracy: "
                "the askexpert row measures the experts answering almost everything, not an edge/near-edge trade-off",
            )
        ]
    return []


def findings(report: dict) -> list[Finding]:
    """Every sanity finding of a report dictionary, in reading order (data, models, operating point)."""
    data = report.get("data") or {}
    test_images, num_classes = positive_count(data.get("test_size")), positive_count(data.get("num_classes"))
    out: list[Finding] = []
    if test_images is None or num_classes is None:
        out.append(
            finding(
                "no_test_images",
                "data",
                f"data: {data.get('test_size')!r} test images of {data.get('num_classes')!r} classes, so no accuracy "
                "in this report can be compared with chance",
            )
        )
    return out + model_findings(report, test_images, num_classes) + operating_point_findings(report, test_images)
