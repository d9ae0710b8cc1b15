"""Expert partitions: superclass / confusion / random / explicit, overlap, the JSON artefact, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from askexpert.errors import UserError
from datamodules.labels import CIFAR100_FINE_NAMES, CIFAR100_FINE_TO_COARSE
from datamodules.partitions import (
    Partition,
    add_overlap,
    build_partition,
    confusion_partition,
    random_partition,
    superclass_partition,
)

NAMES = list(CIFAR100_FINE_NAMES)
SUPER = list(CIFAR100_FINE_TO_COARSE)


def superclasses_of(group: list[int], class_to_superclass: list[int]) -> set[int]:
    return {class_to_superclass[c] for c in group}


def test_superclass_groups_keep_superclasses_whole_and_balanced():
    groups = superclass_partition(SUPER, 4)
    assert [len(g) for g in groups] == [25, 25, 25, 25]
    assert sorted(c for g in groups for c in g) == list(range(100))
    owners = {}
    for e, group in enumerate(groups):
        for s in superclasses_of(group, SUPER):
            assert owners.setdefault(s, e) == e, f"superclass {s} is split across experts"
    assert all(len(superclasses_of(g, SUPER)) == 5 for g in groups)


def test_superclass_groups_balance_uneven_superclasses():
    # superclass sizes 6, 5, 4, 3, 2 over 20 classes -> 2 experts get 10 classes each
    sizes = [6, 5, 4, 3, 2]
    class_to_superclass = [s for s, n in enumerate(sizes) for _ in range(n)]
    groups = superclass_partition(class_to_superclass, 2)
    assert sorted(len(g) for g in groups) == [10, 10]
    assert superclasses_of(groups[0], class_to_superclass).isdisjoint(superclasses_of(groups[1], class_to_superclass))


def test_more_experts_than_superclasses_is_refused():
    with pytest.raises(UserError, match="cannot split 20 superclasses into 21"):
        superclass_partition(SUPER, 21)


def planted_confusion(num_classes: int, pairs: list[tuple[int, int]], seed: int = 0) -> torch.Tensor:
    """A mostly-diagonal confusion matrix with light random noise and heavy confusion inside `pairs`."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 3, (num_classes, num_classes), generator=g).float()
    counts += torch.eye(num_classes) * 50
    for a, b in pairs:
        counts[a, b] += 40
        counts[b, a] += 40
    return counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_partition_puts_a_planted_confusable_pair_together(seed):
    pairs = [(3, 17), (5, 40), (22, 91)]
    groups = confusion_partition(planted_confusion(100, pairs, seed), num_experts=4, seed=seed)
    assert sorted(c for g in groups for c in g) == list(range(100))
    assert max(len(g) for g in groups) <= 25  # balanced: capacity ceil(100 / 4)
    for a, b in pairs:
        assert any(a in g and b in g for g in groups), f"classes {a} and {b} were split: {groups}"


def test_confusion_partition_finds_planted_blocks():
    # two blocks of classes confused among themselves -> two experts recover exactly those blocks
    counts = torch.eye(8) * 50
    for block in ([0, 2, 4, 6], [1, 3, 5, 7]):
        for a in block:
            for b in block:
                if a != b:
                    counts[a, b] = 10
    assert confusion_partition(counts, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_random_partition_is_seeded_balanced_and_complete():
    a, b, c = random_partition(100, 4, 0), random_partition(100, 4, 0), random_partition(100, 4, 1)
    assert a == b and a != c
    assert [len(g) for g in a] == [25] * 4
    assert sorted(x for g in a for x in g) == list(range(100))


def test_explicit_lists_accept_names_and_ids():
    p = build_partition("explicit", NAMES[:6], experts=[["apple", 1, "2"], [3, "beaver", 5]])
    assert p.experts == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(UserError, match="unknown class name 'pear'"):
        build_partition("explicit", NAMES[:6], experts=[["pear"], [1]])


def test_overlap_adds_the_most_confused_outside_classes():
    counts = planted_confusion(8, [(1, 6)])
    extended = add_overlap([[0, 1, 2, 3], [4, 5, 6, 7]], counts, per_expert=1)
    assert 6 in extended[0] and 1 in extended[1]
    assert [len(g) for g in extended] == [5, 5]


def test_artefact_round_trips(tmp_path):
    p = build_partition("superclass", NAMES, num_experts=4, class_to_superclass=SUPER)
    path = tmp_path / "partition.json"
    p.save(str(path))
    raw = json.loads(path.read_text())
    assert raw["experts"][0]["names"] == [NAMES[c] for c in p.experts[0]]
    loaded = Partition.load(str(path))
    assert loaded.experts == p.experts and loaded.class_names == NAMES and loaded.method == "superclass"
    assert loaded.coverage().sum(0).tolist() == [1] * 100


@pytest.mark.parametrize(
    ("experts", "message"),
    [
        ([[0, 1], []], "expert 1 has an empty class subset"),
        ([[0, 1], [2, 7]], "class id 7 is out of range for 4 classes"),
        ([[0, 1], [1, 1, 2, 3]], "lists a class more than once"),
        ([[0], [1]], "2 classes belong to no expert"),
    ],
)
def test_bad_partitions_are_refused(experts, message):
    with pytest.raises(UserError, match=message):
        Partition(experts, ["a", "b", "c", "d"]).check()


def test_uncovered_classes_can_be_allowed_explicitly():
    assert Partition([[0], [1]], ["a", "b", "c"]).check(allow_uncovered=True).num_experts == 2


def test_a_partition_refuses_data_with_other_classes():
    p = Partition([[0], [1]], ["a", "b"])
    with pytest.raises(UserError, match="built for 2 classes"):
        p.check_classes(["a", "b", "c"])


def test_unreadable_partition_files(tmp_path):
    with pytest.raises(UserError, match="partition file not found"):
        Partition.load(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text('{"experts": 3}')
    with pytest.raises(UserError, match="is not a partition file"):
        Partition.load(str(tmp_path / "bad.json"))


def test_methods_and_their_requirements():
    with pytest.raises(UserError, match="unknown partition method 'kmeans'; methods: superclass, confusion"):
        build_partition("kmeans", NAMES)
    with pytest.raises(UserError, match="needs a trained generalist"):
        build_partition("confusion", NAMES)
    with pytest.raises(UserError, match="has no superclasses"):
        build_partition("superclass", NAMES)
    with pytest.raises(UserError, match="--overlap needs"):
        build_partition("random", NAMES, overlap=2)


def test_a_hand_written_file_with_uncovered_classes_needs_the_flag(tmp_path):
    raw = {"class_names": ["a", "b", "c"], "experts": [{"classes": [0]}, {"classes": [1]}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="1 classes belong to no expert"):
        Partition.load(str(path))
    raw["details"] = {"allow_uncovered": True}
    path.write_text(json.dumps(raw))
    assert Partition.load(str(path)).experts == [[0], [1]]


@pytest.mark.parametrize(("num_classes", "num_experts"), [(9, 4), (7, 3), (100, 6)])
def test_confusion_partition_sizes_differ_by_at_most_one(num_classes, num_experts):
    for seed in range(10):
        counts = torch.rand(num_classes, num_classes, generator=torch.Generator().manual_seed(seed)) * 10
        groups = confusion_partition(counts, num_experts, seed=seed)
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1, (seed, sizes)
        assert sorted(c for g in groups for c in g) == list(range(num_classes))


def test_a_partition_file_of_another_format_or_with_non_integer_ids_is_refused(tmp_path):
    names = [f"c{i}" for i in range(4)]
    Partition([[0, 1], [2, 3]], names).save(str(tmp_path / "p.json"))
    raw = json.loads((tmp_path / "p.json").read_text())
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(UserError, match="partition file of format 99; this askexpert reads format 1"):
        Partition.load(str(newer))
    raw["experts"][0]["classes"][0] = 1.5
    floats = tmp_path / "floats.json"
    floats.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="class id 1.5 is not a whole number"):
        Partition.load(str(floats))
