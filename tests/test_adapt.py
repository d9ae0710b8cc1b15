"""`adapt`: the session's tiny pipeline run adapted round by round (stream, distillation, τ, resume, record, export)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers.cli import assert_clean_failure, one_line, run_main
from helpers.pipelines import TINY_DATA, make_four_class_folder

from askexpert.adapt.distill import DistillSettings, ReplayBatchSampler, fine_tune
from askexpert.adapt.record import read_record, write_record
from askexpert.adapt.stream import simulated_stream
from askexpert.adapt.table import COLUMNS
from askexpert.cli import cli_main
from askexpert.collab.logits import batched_logits
from askexpert.deploy.bundle import load_bundle
from askexpert.errors import UserError
from askexpert.files.checkpoints import load_checkpoint
from askexpert.files.hashing import file_sha256
from askexpert.modules.loading import load_classifier
from datamodules.datamodule import ImageDataModule
from datamodules.synthetic import make_synthetic_stream, synthetic_metadata

# 20 stream images a round, 8 of them and 8 replay images in every step of one epoch: seconds per round
ARGS = ["--stream_size", "40", "--batch_size", "16", "--epochs", "1", "--eval_batch_size", "256"]


@pytest.fixture(scope="module")
def adapted(tiny_pipeline_run, tmp_path_factory):
    """(run, adapt folder, rows) of two rounds on the tiny run. Read-only: a test that changes it copies it."""
    _, run = tiny_pipeline_run
    out = tmp_path_factory.mktemp("adapt") / "adapt"
    rows = cli_main(["adapt", "--run", str(run), "--rounds", "2", "--out", str(out), *ARGS])
    return run, out, rows


def hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in images}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(str(path))["state_dict"]


def test_rounds_are_measured_saved_and_tabulated(adapted) -> None:
    run, out, rows = adapted
    table = read_csv(out / "adapt.csv")
    assert list(table[0]) == list(COLUMNS) and [int(row["round"]) for row in table] == [0, 1, 2]
    assert (out / "adapt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # round 0 is the run itself: τ chosen on validation as its report did (the tiny run has no calibration split)
    report = json.loads((run / "report.json").read_text())
    assert rows[0]["tau"] == pytest.approx(report["selected"]["threshold"])
    assert rows[0]["acc"] == pytest.approx(report["selected"]["acc"])
    assert rows[0]["eq_tau"] == rows[0]["tau"] and rows[0]["eq_reached"]
    kept_total = 0
    for r, row in enumerate(rows[1:], start=1):
        assert row["stream_images"] == 20 and row["kept"] <= row["offloaded"] <= 20
        kept_total += row["kept"]
        assert row["kept_total"] == kept_total
        assert row["eq_target_val_acc"] == pytest.approx(rows[0]["val_acc"])
        assert 0 <= row["offload_ratio"] <= 1 and row["latency_ms"] > 0 and 0 <= row["tau"] <= 1
        assert int(table[r]["kept"]) == row["kept"]
        # the checkpoint of every round is the run's format: it reloads as a generalist with new weights
        model = load_classifier(str(out / f"round_{r}" / "generalist.ckpt"))
        assert type(model).__name__ == "GeneralistModule" and model.hparams.model_name == "vit_micro_patch8_32"
    before, after = weights(run / "generalist/checkpoints/best.ckpt"), weights(out / "round_2/generalist.ckpt")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    identity = json.loads((out / "adapt.json").read_text())["identity"]
    assert identity["stream"] == {"kind": "synthetic", "synthetic_seed": 0, "round_size": 20, "seed": 0}


def test_finished_rounds_are_skipped_more_rounds_continue_other_settings_are_refused(adapted, tmp_path, capsys):
    run, out, _ = adapted
    copy = tmp_path / "adapt"
    shutil.copytree(out, copy)
    stamps = {p.name: p.stat().st_mtime_ns for p in (copy / "round_1", copy / "round_2") for p in p.iterdir()}
    base = ["adapt", "--run", str(run), "--out", str(copy)]
    code, stdout, _ = run_main([*base, "--rounds", "2", *ARGS], capsys)
    assert code == 0 and "round 1: finished earlier" in stdout and "round 2: finished earlier" in stdout
    # a third round on the next 20 images: --stream_size grows with --rounds, the round size stays
    code, stdout, _ = run_main([*base, "--rounds", "3", *ARGS[2:], "--stream_size", "60"], capsys)
    assert code == 0 and "round 3: kept" in stdout and "round 2: finished earlier" in stdout
    assert [int(row["round"]) for row in read_csv(copy / "adapt.csv")] == [0, 1, 2, 3]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (copy / "round_1", copy / "round_2") for p in p.iterdir()}
    # settings other than the folder's are refused in one line, and nothing changes
    files = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    code, _, err = run_main([*base, "--rounds", "3", *ARGS[2:], "--stream_size", "60", "--replay", "0.25"], capsys)
    one_line(code, err, "adapted with other settings", "distill.replay 0.5 -> 0.25", "--overwrite")
    code, _, err = run_main([*base, "--rounds", "3", *ARGS], capsys)  # 40 images over 3 rounds: 13 a round
    one_line(code, err, "stream.round_size 20 -> 13")
    assert files == {p: p.stat().st_mtime_ns for p in copy.rglob("*")}


def test_an_interrupted_round_is_done_again_to_the_same_weights(adapted, tmp_path, capsys) -> None:
    run, out, rows = adapted
    copy = tmp_path / "adapt"
    shutil.copytree(out, copy)
    (copy / "round_2" / "metrics.json").unlink()  # killed before its marker: the round is not finished
    code, stdout, _ = run_main(["adapt", "--run", str(run), "--out", str(copy), "--rounds", "2", *ARGS], capsys)
    assert code == 0 and "round 1: finished earlier" in stdout and "round 2: kept" in stdout
    again, first = weights(copy / "round_2/generalist.ckpt"), weights(out / "round_2/generalist.ckpt")
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert json.loads((copy / "round_2/metrics.json").read_text())["acc"] == rows[2]["acc"]


def test_a_round_trained_again_retrains_or_removes_the_rounds_built_on_it(adapted, tmp_path, capsys) -> None:
    run, out, _ = adapted
    copy = tmp_path / "adapt"
    shutil.copytree(out, copy)
    (copy / "round_1" / "kept.safetensors").unlink()  # round 1 damaged: round 2 stood on its weights
    one_round = ["--rounds", "1", "--stream_size", "20", *ARGS[2:]]  # the same 20 images a round
    code, stdout, err = run_main(["adapt", "--run", str(run), "--out", str(copy), *one_round], capsys)
    assert code == 0, err
    assert "round 1: kept" in stdout and "round 2: built on a round trained again" in stdout
    assert not (copy / "round_2").exists() and len(read_csv(copy / "adapt.csv")) == 2
    shutil.rmtree(copy)
    shutil.copytree(out, copy)
    (copy / "round_1" / "metrics.json").unlink()
    code, stdout, _ = run_main(["adapt", "--run", str(run), "--out", str(copy), "--rounds", "2", *ARGS], capsys)
    assert code == 0 and "round 2: finished earlier" not in stdout and "round 2: kept" in stdout


def test_the_stream_never_overlaps_training_validation_or_test_images(adapted) -> None:
    _, out, _ = adapted
    datamodule = ImageDataModule(**TINY_DATA)
    seen = set().union(*(hashes(datamodule.tensors(split)[0]) for split in ("train", "val", "test")))
    stream = simulated_stream(datamodule, 3, 60, seed=0)
    assert len(hashes(stream.images)) == len(stream.images) >= 60 and not hashes(stream.images) & seen
    kept = set()
    for r in (1, 2):
        from safetensors.torch import load_file

        kept |= hashes(load_file(str(out / f"round_{r}" / "kept.safetensors"))["images"])
    assert kept and kept <= hashes(stream.images) and not kept & seen
    # which images round r gets does not depend on how many rounds are asked for
    two = simulated_stream(datamodule, 2, 40, seed=0)
    assert all(torch.equal(two.round(r).images, stream.round(r).images) for r in (1, 2))
    assert not hashes(stream.round(1).images) & hashes(stream.round(2).images)
    # the stream split is another generator stream: a larger rendering extends a smaller one
    small, large = make_synthetic_stream(1)[0], make_synthetic_stream(2)[0]
    assert torch.equal(large[:100], small)


def test_other_sources_stream_their_calibration_split(tmp_path) -> None:
    root = make_four_class_folder(tmp_path / "data", side=8)
    data = {"source": "imagefolder", "root": str(root), "val_fraction": 0.25, "image_size": 8}
    datamodule = ImageDataModule(**data, calib_fraction=0.25)
    stream = simulated_stream(datamodule, 2, None, seed=1)
    calib = datamodule.tensors("calib")[0]
    assert stream.round_size == len(calib) // 2 and hashes(stream.images) == hashes(calib)
    others = set().union(*(hashes(datamodule.tensors(split)[0]) for split in ("train", "val", "test")))
    assert not hashes(calib) & others
    with pytest.raises(UserError, match=r"no calibration split .* --record FILE"):
        simulated_stream(ImageDataModule(**data), 2, None, seed=0)
    with pytest.raises(UserError, match="only 4 images, fewer than --stream_size 5"):
        simulated_stream(datamodule, 2, 5, seed=0)


def test_the_replay_share_of_every_batch_is_exact(tiny_pipeline_run, tmp_path) -> None:
    sampler = ReplayBatchSampler(stream=10, replay=50, batch_size=16, replay_count=4, steps=5, seed=0)
    epochs = []
    for _ in range(2):
        batches = list(sampler)
        epochs.append(batches)
        assert len(batches) == 5 and all(len(b) == 16 and sum(i >= 10 for i in b) == 4 for b in batches)
        # every stream image equally often (60 stream draws of 10 images), replay never twice before all are seen
        counts = np.bincount([i for b in batches for i in b if i < 10], minlength=10)
        assert counts.tolist() == [6] * 10 and len({i for b in batches for i in b if i >= 10}) == 20
    assert epochs[0] != epochs[1]  # each epoch draws anew
    assert [DistillSettings(batch_size=16, replay=share).replay_count() for share in (0, 0.3, 0.5, 1)] == [0, 5, 8, 16]
    # what the model saw in a real fine-tuning: counted in the training step
    _, run = tiny_pipeline_run
    generalist = load_classifier(str(run / "generalist/checkpoints/best.ckpt"))
    generator = torch.Generator().manual_seed(0)
    kept = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=generator)
    soft = torch.rand(30, 100, generator=generator).softmax(-1)
    replay = ImageDataModule(**TINY_DATA).tensors("train")
    settings = DistillSettings(epochs=2, batch_size=16, replay=0.25)
    stats = fine_tune(generalist, (kept, soft), replay, settings, 0, (4, True), str(tmp_path))
    assert stats["replay_per_batch"] == [4] and stats["steps"] == 2 * math.ceil(30 / 12)
    assert stats["replay_images_seen"] == 4 * stats["steps"] and stats["stream_images_seen"] == 12 * stats["steps"]


def test_a_record_is_the_stream_and_its_answers_are_the_soft_labels(tiny_pipeline_run, tmp_path, capsys) -> None:
    _, run = tiny_pipeline_run
    images = make_synthetic_stream(1, seed=5)[0][:20]
    soft = torch.rand(20, 100, generator=torch.Generator().manual_seed(1)).softmax(-1)
    names = synthetic_metadata()[0]
    path = tmp_path / "answers.npz"
    write_record(str(path), images, soft, names, "abc123")
    record = read_record(str(path), names, 32)
    assert np.array_equal(record.images, images.numpy()) and record.model_version == "abc123"
    out = tmp_path / "adapt"
    argv = ["adapt", "--run", str(run), "--record", str(path), "--rounds", "2", "--out", str(out), *ARGS[2:]]
    code, stdout, _ = run_main(argv, capsys)
    assert code == 0 and "record" in stdout and "export version abc123" in stdout
    table = read_csv(out / "adapt.csv")
    assert [(row["stream_images"], row["offloaded"], row["kept"]) for row in table[1:]] == [("10", "10", "10")] * 2
    from safetensors.torch import load_file

    rows = {h: i for i, h in enumerate(hashes(images[i : i + 1]).pop() for i in range(20))}
    for r in (1, 2):
        kept = load_file(str(out / f"round_{r}" / "kept.safetensors"))
        for image, labels in zip(kept["images"], kept["soft_labels"], strict=True):
            assert torch.equal(labels, soft[rows[hashes(image[None]).pop()]])  # the expert's answer, as recorded


def _record(tmp_path, **change) -> str:
    arrays = {
        "images": np.zeros((4, 3, 32, 32), np.uint8),
        "soft_labels": np.full((4, 100), 0.01, np.float32),
        "class_names": np.asarray(synthetic_metadata()[0]),
        "model_version": np.asarray("v1"),
    }
    arrays.update(change)
    path = tmp_path / "record.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": np.asarray([object()], dtype=object)}, "holds Python objects"),
        ({"images": np.zeros((4, 3, 32, 32), np.float32)}, "images must be uint8 (N, 3, S, S)"),
        ({"images": np.zeros((4, 3, 16, 16), np.uint8)}, "holds 16 px images but the run stores 32 px"),
        ({"soft_labels": np.full((4, 100), 0.02, np.float32)}, "rows must sum to 1"),
        ({"soft_labels": np.full((4, 100), np.nan, np.float32)}, "negative or non-finite"),
        ({"soft_labels": np.full((4, 100), 0.01, np.float64)}, "soft_labels must be float32 (N, C)"),
        ({"soft_labels": None}, "lacks soft_labels"),
        ({"class_names": np.asarray([f"c{i}" for i in range(100)])}, "other classes than the run's"),
        ({"model_version": np.asarray(["v1", "v2"])}, "model_version must be a 0-d unicode array"),
    ],
)
def test_bad_records_are_refused_in_one_line(tiny_pipeline_run, tmp_path, capsys, change, message) -> None:
    _, run = tiny_pipeline_run
    out = tmp_path / "adapt"
    code, _, err = run_main(
        ["adapt", "--run", str(run), "--record", _record(tmp_path, **change), "--out", str(out)], capsys
    )
    assert_clean_failure(code, err, out, message)


def test_damaged_records_and_bad_writes_are_refused(tiny_pipeline_run, tmp_path, capsys) -> None:
    _, run = tiny_pipeline_run
    out = tmp_path / "adapt"
    for content, message in ((None, "not found"), (b"not a zip", "damaged or not a NumPy .npz record")):
        path = tmp_path / "x.npz"
        if content is not None:
            path.write_bytes(content)
        code, _, err = run_main(["adapt", "--run", str(run), "--record", str(path), "--out", str(out)], capsys)
        assert_clean_failure(code, err, out, message)
    with pytest.raises(UserError, match="rows must sum to 1"):
        write_record(str(tmp_path / "w.npz"), np.zeros((2, 3, 32, 32), np.uint8), np.ones((2, 100)), ["a"] * 100, "v")
    assert not (tmp_path / "w.npz").exists()


def test_bad_arguments_are_refused_in_one_line(tiny_pipeline_run, tmp_path, capsys) -> None:
    _, run = tiny_pipeline_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "pipeline.yaml", unfinished)
    stages = json.loads((run / "stages.json").read_text())
    stages["base"]["done"] = False
    (unfinished / "stages.json").write_text(json.dumps(stages))
    out = tmp_path / "adapt"
    for argv, message in (
        (["--run", str(run), "--rounds", "0"], "--rounds must be at least 1"),
        (
            ["--run", str(run), "--replay", "1.5"],
            "--replay is the share of each batch from the training split, in [0, 1]",
        ),
        (["--run", str(tmp_path / "nope")], "run folder not found"),
        (["--run", str(unfinished)], "stage base of"),
        (["--run", str(run), "--stream_size", "1", "--rounds", "2"], "--stream_size 1 is too small for --rounds 2"),
        (["--run", str(run), "--replay", "0.99", "--batch_size", "16"], "no room for the experts' answers"),
    ):
        code, _, err = run_main(["adapt", *argv, "--out", str(out)], capsys)
        assert_clean_failure(code, err, out, message)


def test_the_export_gets_the_adapted_generalist_as_a_new_version(adapted, tiny_export, tmp_path, capsys) -> None:
    run, out, rows = adapted
    export, adapt = tmp_path / "export", tmp_path / "adapt"
    shutil.copytree(tiny_export[0], export)
    shutil.copytree(out, adapt)
    old = load_bundle(str(export))
    argv = ["adapt", "--run", str(run), "--out", str(adapt), "--rounds", "2", *ARGS, "--export", str(export)]
    code, stdout, _ = run_main(argv, capsys)
    new = load_bundle(str(export))
    assert code == 0 and f"version {old.version} -> {new.version}" in stdout and new.version != old.version
    assert new.operating_point["threshold"] == rows[-1]["tau"]
    assert new.operating_point["temperature_value"] == rows[-1]["temperature"]
    assert new.manifest["adapted"]["previous_version"] == old.version
    generalist = new.manifest["models"]["generalist"]
    assert generalist["checkpoint_sha256"] == file_sha256(str(adapt / "round_2" / "generalist.ckpt"))
    assert generalist["sha256"] != old.manifest["models"]["generalist"]["sha256"]
    assert generalist["int8"]["sha256"] != old.manifest["models"]["generalist"]["int8"]["sha256"]
    for name in old.expert_names:  # the experts are the run's, unchanged
        assert new.manifest["models"][name] == old.manifest["models"][name]
    # what the edge client loads at its next start (hash-checked) answers as the adapted checkpoint does
    images = ImageDataModule(**TINY_DATA).tensors("test")[0][:16]
    onnx = torch.from_numpy(new.session("generalist").run(None, {"images": images.numpy()})[0])
    expected = batched_logits(load_classifier(str(adapt / "round_2" / "generalist.ckpt")), [images])
    assert torch.allclose(onnx, expected, atol=1e-3)
    new.session("generalist", precision="int8")
    # the same rounds again: nothing to re-export, so the version (what edge clients check) stays
    code, stdout, _ = run_main(argv, capsys)
    assert code == 0 and f"already holds round 2's generalist (version {new.version})" in stdout
    assert load_bundle(str(export)).version == new.version
    # an export that deploys a second expert is refused: adapt's τ is a one-expert operating point
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["operating_point"]["second_expert"] = {"margin": 0.5, "fusion": "mass"}
    (export / "manifest.json").write_text(json.dumps(manifest))
    before = (export / "manifest.json").read_bytes()
    code, _, err = run_main(argv, capsys)
    one_line(code, err, "deploys a second expert")
    assert (export / "manifest.json").read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    # an export of other experts is refused before anything runs
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["models"]["expert_0"]["checkpoint_sha256"] = "0" * 64
    (export / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_main(argv, capsys)
    one_line(code, err, "holds other experts than this run's")


def test_the_constrained_point_is_the_deployment_when_asked(tiny_pipeline_run, tmp_path, capsys) -> None:
    """`--point constrained` routes the stream and chooses τ under the run's routing.constrained limits; a run
    evaluated without them is refused in one line, before anything is written."""
    _, source = tiny_pipeline_run
    run = tmp_path / "run"
    shutil.copytree(source, run, symlinks=True)
    out = tmp_path / "adapt"
    code, _, err = run_main(["adapt", "--run", str(run), "--point", "constrained", "--out", str(out), *ARGS], capsys)
    one_line(code, err, "--point constrained needs")
    assert not out.exists()
    code, _, err = run_main(["adapt", "--run", str(run), "--point", "nearest", "--out", str(out), *ARGS], capsys)
    one_line(code, err, "unknown --point 'nearest'")
    cli_main(["evaluate", "--run", str(run), "--routing.constrained.offload_ratio", "0.2"])
    report = json.loads((run / "report.json").read_text())
    rows = cli_main(["adapt", "--run", str(run), "--rounds", "1", "--point", "constrained", "--out", str(out), *ARGS])
    assert rows[0]["tau"] == pytest.approx(report["constrained"]["threshold"])
    assert rows[0]["acc"] == pytest.approx(report["constrained"]["acc"])
    assert rows[1]["offloaded"] <= rows[1]["stream_images"]
    identity = json.loads((out / "adapt.json").read_text())["identity"]
    assert identity["routing"]["budget"]["offload_ratio"] == 0.2
