"""Expert partitions: which classes each expert is responsible for, built once and saved as JSON.

A partition is a list of class-id lists, one per expert. Methods:
- `superclass`: whole superclasses packed into N groups of (nearly) equal class counts;
- `confusion`: spectral clustering of a generalist's validation confusion matrix, with balanced sizes, so
  classes the generalist mixes up go to the same expert (the expert is then asked exactly the hard question);
- `random`: a seeded balanced shuffle (the control);
- `explicit`: lists given by the user (class ids or names).
`overlap` adds to every expert the K outside classes the generalist confuses most with its members, so a
sample the generalist half-recognises still reaches an expert that knows its class; K stops short of giving any
expert every class (`check_overlap`).

The JSON artefact records class ids and names per expert plus how it was built; training, evaluation and
deployment all read the same file, and `Partition.load` refuses a file whose classes differ from the data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from askexpert.errors import UserError
from askexpert.files.atomic import write_json

METHODS = ("superclass", "confusion", "random", "explicit")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Partition:
    """Class subsets of the experts, over a dataset with `class_names`."""

    experts: list[list[int]]
    class_names: list[str]
    method: str = "explicit"
    details: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def classes_of(self, expert_index: int) -> list[int]:
        if not 0 <= expert_index < self.num_experts:
            raise UserError(
                f"expert index {expert_index} is out of range: the partition has {self.num_experts} experts"
            )
        return list(self.experts[expert_index])

    def coverage(self) -> torch.Tensor:
        """(num_experts, num_classes) bool: which expert covers which class (what routing scores against)."""
        table = torch.zeros(self.num_experts, self.num_classes, dtype=torch.bool)
        for e, classes in enumerate(self.experts):
            table[e, classes] = True
        return table

    def check(self, allow_uncovered: bool = False) -> Partition:
        """Raise UserError for empty subsets, out-of-range or repeated ids and (unless allowed) uncovered classes."""
        if not self.experts:
            raise UserError("a partition needs at least one expert")
        for e, classes in enumerate(self.experts):
            if not classes:
                raise UserError(f"expert {e} has an empty class subset")
            for c in classes:
                if not isinstance(c, int) or isinstance(c, bool):
                    raise UserError(f"expert {e}: class id {c!r} is not a whole number (ids are 0-based integers)")
                if not 0 <= c < self.num_classes:
                    raise UserError(f"expert {e}: class id {c!r} is out of range for {self.num_classes} classes")
            if len(set(classes)) != len(classes):
                raise UserError(f"expert {e} lists a class more than once")
        uncovered = sorted(set(range(self.num_classes)) - {c for classes in self.experts for c in classes})
        if uncovered and not allow_uncovered:
            names = ", ".join(self.class_names[c] for c in uncovered[:5])
            more = f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else ""
            raise UserError(
                f"{len(uncovered)} classes belong to no expert ({names}{more}); "
                "cover them or allow it explicitly (--allow_uncovered true)"
            )
        return self

    def check_classes(self, class_names: Sequence[str], what: str = "the data") -> None:
        """Refuse to use this partition with a dataset of different classes."""
        if list(class_names) != self.class_names:
            raise UserError(
                f"the partition was built for {self.num_classes} classes ({', '.join(self.class_names[:3])}, ...) "
                f"but {what} has {len(class_names)} classes ({', '.join(list(class_names)[:3])}, ...)"
            )

    # -- the artefact --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "details": self.details,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "experts": [
                {"index": e, "classes": list(classes), "names": [self.class_names[c] for c in classes]}
                for e, classes in enumerate(self.experts)
            ],
        }

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str, allow_uncovered: bool = False) -> Partition:
        """Read a partition JSON written by `save` (or by hand, in the same layout).

        Classes that no expert covers are refused unless the file says `"details": {"allow_uncovered": true}`
        (what `partition --allow_uncovered true` writes) or the caller allows them.
        """
        if not os.path.isfile(path):
            raise UserError(f"partition file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            experts = [list(entry["classes"]) for entry in raw["experts"]]
            partition = cls(experts, list(raw["class_names"]), raw.get("method", "explicit"), raw.get("details", {}))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not a partition file ({type(err).__name__}: {err})") from None
        version = raw.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise UserError(
                f"{path} is a partition file of format {version!r}; this askexpert reads format {FORMAT_VERSION} "
                "(write it again with `python -m askexpert partition`)"
            )
        if not isinstance(partition.details, dict) or not all(isinstance(n, str) for n in partition.class_names):
            raise UserError(f"{path} is not a partition file (details must be a mapping, class_names texts)")
        partition.check(allow_uncovered=True)  # ids in range before the names they index are compared
        _cross_check(raw, partition, path)
        return partition.check(allow_uncovered=allow_uncovered or partition.details.get("allow_uncovered", False))


def _cross_check(raw: dict, partition: Partition, path: str) -> None:
    """Refuse a file whose redundant fields (`num_classes`, each expert's `index` and `names`) contradict its class
    ids: a hand edit changed one and not the other, and which one is meant cannot be guessed."""
    if "num_classes" in raw and raw["num_classes"] != partition.num_classes:
        raise UserError(
            f"{path}: num_classes is {raw['num_classes']!r} but class_names lists {partition.num_classes} classes"
        )
    for position, entry in enumerate(raw["experts"]):
        if "index" in entry and entry["index"] != position:
            raise UserError(f"{path}: expert {position} says index {entry['index']!r}; experts are listed in order")
        given = entry.get("names")
        if given is None:
            continue
        ids = partition.experts[position]
        if not isinstance(given, list) or len(given) != len(ids):
            raise UserError(f"{path}: expert {position} lists {len(ids)} class ids but other names: {given!r}")
        for c, name in zip(ids, given, strict=True):
            if name != partition.class_names[c]:
                raise UserError(
                    f"{path}: expert {position} names class {c} {name!r}, but class {c} is {partition.class_names[c]!r}"
                )


# -- builders ----------------------------------------------------------------------------------------
def _check_num_experts(num_experts: int, num_groups: int, what: str) -> None:
    if num_experts < 1:
        raise UserError(f"--num_experts must be at least 1, got {num_experts}")
    if num_experts > num_groups:
        raise UserError(f"cannot split {num_groups} {what} into {num_experts} non-empty experts")


def superclass_partition(class_to_superclass: Sequence[int], num_experts: int) -> list[list[int]]:
    """Whole superclasses packed into `num_experts` groups of near-equal class counts.

    Largest superclass first, each into the group with the fewest classes so far (ties: lowest index),
    then moves and swaps of whole superclasses between the largest and the smallest group while that
    narrows the gap. Exact for CIFAR-100 (4 experts x 25 classes); near-balanced for uneven hierarchies.
    """
    members: dict[int, list[int]] = {}
    for c, s in enumerate(class_to_superclass):
        members.setdefault(int(s), []).append(c)
    _check_num_experts(num_experts, len(members), "superclasses")
    order = sorted(members, key=lambda s: (-len(members[s]), s))
    groups: list[list[int]] = [[] for _ in range(num_experts)]
    for s in order:
        target = min(range(num_experts), key=lambda g: (len(groups[g]), g))
        groups[target].append(s)
    size = lambda g: sum(len(members[s]) for s in g)  # noqa: E731
    for _ in range(10 * len(members)):
        big = max(range(num_experts), key=lambda g: (size(groups[g]), -g))
        small = min(range(num_experts), key=lambda g: (size(groups[g]), g))
        gap = size(groups[big]) - size(groups[small])
        # candidate changes: move a from big to small, or swap a (big) with b (small); keep the best
        options = [(a, None) for a in groups[big]] + [(a, b) for a in groups[big] for b in groups[small]]
        best, best_gap = None, gap
        for a, b in options:
            delta = len(members[a]) - (len(members[b]) if b is not None else 0)
            if 0 < delta < gap and abs(gap - 2 * delta) < best_gap:
                best, best_gap = (a, b), abs(gap - 2 * delta)
        if best is None:
            break
        a, b = best
        groups[big].remove(a)
        groups[small].append(a)
        if b is not None:
            groups[small].remove(b)
            groups[big].append(b)
    return [sorted(c for s in g for c in members[s]) for g in groups]


def random_partition(num_classes: int, num_experts: int, seed: int) -> list[list[int]]:
    """A seeded shuffle of the classes cut into `num_experts` near-equal groups."""
    _check_num_experts(num_experts, num_classes, "classes")
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(order[g::num_experts]) for g in range(num_experts)]


def explicit_partition(experts: Sequence[Sequence[int | str]], class_names: Sequence[str]) -> list[list[int]]:
    """User-given subsets; entries may be class ids or class names."""
    index = {name: c for c, name in enumerate(class_names)}
    groups = []
    for e, classes in enumerate(experts):
        group = []
        for c in classes:
            if isinstance(c, str) and not c.lstrip("-").isdigit():
                if c not in index:
                    raise UserError(f"expert {e}: unknown class name {c!r}")
                group.append(index[c])
            else:
                group.append(int(c))
        groups.append(group)
    return groups


def _balanced_assignment(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Assign points to centroids minimising total squared distance, with group sizes as equal as possible.

    Every centroid offers ceil(n / k) seats, of which the first floor(n / k) are mandatory (a large bonus
    makes the solver fill them first), so sizes differ by at most one.
    """
    from scipy.optimize import linear_sum_assignment

    n, k = len(points), len(centroids)
    low, high = n // k, -(-n // k)
    cost = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # (n, k)
    seats = np.repeat(cost, high, axis=1)  # centroid j owns columns j*high ... j*high + high - 1
    mandatory = (np.arange(k * high) % high) < low
    seats[:, mandatory] -= 1e6
    rows, cols = linear_sum_assignment(seats)
    assignment = np.empty(n, dtype=np.int64)
    assignment[rows] = cols // high
    return assignment


def confusion_partition(
    confusion: torch.Tensor, num_experts: int, seed: int = 0, iterations: int = 20
) -> list[list[int]]:
    """Balanced spectral clustering of a (C, C) confusion matrix (rows: true class, columns: predicted).

    Affinity = symmetrised off-diagonal confusion rates; the embedding is the first `num_experts`
    eigenvectors of the normalised affinity; balanced k-means (group sizes floor or ceil of C / N, solved
    as an assignment problem) clusters it, so experts get equal shares of the classes.
    """
    counts = confusion.double()
    num_classes = counts.shape[0]
    _check_num_experts(num_experts, num_classes, "classes")
    if counts.shape != (num_classes, num_classes):
        raise UserError(f"a confusion matrix must be square, got shape {tuple(counts.shape)}")
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    affinity = (rates + rates.T).numpy()
    np.fill_diagonal(affinity, 0.0)
    affinity += 1e-6  # keeps the graph connected when some classes are never confused
    degree = affinity.sum(1)
    normalised = affinity / np.sqrt(np.outer(degree, degree))
    _, vectors = np.linalg.eigh(normalised)
    embedding = vectors[:, -num_experts:]  # largest eigenvalues
    embedding = embedding / np.linalg.norm(embedding, axis=1, keepdims=True).clip(1e-12)
    # farthest-point start: a seeded first centroid, then each next one as far as possible from the chosen
    chosen = [int(np.random.default_rng(seed).integers(num_classes))]
    while len(chosen) < num_experts:
        distance = ((embedding[:, None, :] - embedding[chosen][None, :, :]) ** 2).sum(-1).min(1)
        chosen.append(int(distance.argmax()))
    centroids = embedding[chosen]
    assignment = _balanced_assignment(embedding, centroids)
    for _ in range(iterations):
        centroids = np.stack([embedding[assignment == k].mean(0) for k in range(num_experts)])
        new = _balanced_assignment(embedding, centroids)
        if np.array_equal(new, assignment):
            break
        assignment = new
    groups = [sorted(np.flatnonzero(assignment == k).tolist()) for k in range(num_experts)]
    return sorted(groups, key=lambda g: g[0])  # a stable order: by smallest class id


def check_overlap(overlap: int, num_classes: int, largest_expert: int, option: str = "--overlap") -> None:
    """The one range check of `overlap`: every expert must still leave out a class. More outside classes than the
    largest expert has left would hand it every class (`add_overlap` runs out of classes to add), and with it
    every expert becomes the same all-class model. `largest_expert`: the class count of the largest expert before
    the overlap (a confusion or random partition's is known from the settings: `balanced_largest`)."""
    most = max(num_classes - largest_expert - 1, 0)
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap <= most:
        raise UserError(
            f"{option} must be between 0 and {most}, got {overlap!r} (the largest expert has {largest_expert} of the "
            f"{num_classes} classes; more overlap would give it every class)"
        )


def balanced_largest(num_classes: int, num_experts: int) -> int:
    """The largest expert of a balanced split (confusion, random): sizes are the floor or ceiling of C / N."""
    return -(-num_classes // max(num_experts, 1))


def add_overlap(groups: list[list[int]], confusion: torch.Tensor, per_expert: int) -> list[list[int]]:
    """Give every expert the `per_expert` outside classes most confused with its own (both directions)."""
    check_overlap(per_expert, len(confusion), max(len(group) for group in groups))
    counts = confusion.double()
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    mutual = rates + rates.T
    result = []
    for group in groups:
        inside = torch.zeros(len(counts), dtype=torch.bool)
        inside[group] = True
        score = mutual[:, inside].sum(1)  # how much each class is confused with this expert's classes
        score[inside] = -1.0
        extra = score.argsort(descending=True)[:per_expert].tolist()
        result.append(sorted(group + extra))
    return result


def build_partition(
    method: str,
    class_names: Sequence[str],
    num_experts: int = 4,
    class_to_superclass: Sequence[int] | None = None,
    confusion: torch.Tensor | None = None,
    experts: Sequence[Sequence[int | str]] | None = None,
    overlap: int = 0,
    seed: int = 0,
    allow_uncovered: bool = False,
) -> Partition:
    """Build and check a partition with `method` (see the module docstring for the methods)."""
    if method not in METHODS:
        raise UserError(f"unknown partition method {method!r}; methods: {', '.join(METHODS)}")
    if method != "explicit" and experts:
        raise UserError("expert class lists are only read by --method explicit")
    details: dict = {"num_experts": num_experts, "overlap": overlap, "allow_uncovered": allow_uncovered}
    if method == "superclass":
        if class_to_superclass is None:
            raise UserError("this dataset has no superclasses; use --method confusion, random or explicit")
        groups = superclass_partition(class_to_superclass, num_experts)
    elif method == "confusion":
        if confusion is None:
            raise UserError("--method confusion needs a trained generalist: --generalist CHECKPOINT")
        groups = confusion_partition(confusion, num_experts, seed)
        details["seed"] = seed
    elif method == "random":
        groups = random_partition(len(class_names), num_experts, seed)
        details["seed"] = seed
    else:
        if not experts:
            raise UserError("--method explicit needs the class lists: experts: [[...], [...]] in a --config file")
        groups = explicit_partition(experts, class_names)
        details["num_experts"] = len(groups)
    partition = Partition(groups, list(class_names), method, details).check(allow_uncovered)
    if overlap:
        if confusion is None:
            raise UserError("--overlap needs a trained generalist's confusion matrix: --generalist CHECKPOINT")
        partition = Partition(add_overlap(partition.experts, confusion, overlap), list(class_names), method, details)
    return partition.check(allow_uncovered)
