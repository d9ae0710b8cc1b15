"""`export`: the session's tiny pipeline run as ONNX files + manifest, verified against PyTorch."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch
from helpers.cli import assert_clean_failure, run_main

from askexpert.collab.logits import batched_logits, in_batches
from askexpert.collab.logits import file_sha256 as sha256
from askexpert.modules.loading import load_classifier


@pytest.fixture(scope="module")
def exported(tiny_pipeline_run, tiny_export):
    _, run = tiny_pipeline_run
    out, manifest = tiny_export
    return run, out, manifest


def test_every_model_is_exported_verified_and_described(exported) -> None:
    run, out, manifest = exported
    report = json.loads((run / "report.json").read_text())
    assert sorted(manifest["models"]) == ["expert_0", "expert_1", "generalist"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    point = manifest["operating_point"]
    assert point["threshold"] == report["selected"]["threshold"] and point["gate"] == report["routing"]["gate"]
    assert set(point) >= {"temperature_value", "top_k", "fusion"} and len(manifest["class_names"]) == 100
    assert manifest["partition"]["num_experts"] == 2 and manifest["packages"]["onnxruntime"]
    for entry in manifest["models"].values():
        path = out / entry["file"]
        assert entry["sha256"] == sha256(str(path)) and not (out / f"{entry['file']}.data").exists()
        v = entry["verification"]
        assert v["images"] == report["data"]["test_size"] and v["top1_agreement"] >= 0.999
        assert v["max_abs_logit_diff"] <= manifest["verification"]["atol"]
        assert entry["input"]["dtype"] == "uint8" and entry["input"]["shape"][1:] == [3, 32, 32]
    routing = manifest["verification"]["routing"]
    assert routing["routing_agreement"] >= 0.999 and routing["offloaded_onnx"] == routing["offloaded_torch"]
    assert not list(out.parent.glob(".*partial*"))  # the staging folder is gone


def test_int8_copies_are_measured_not_required_to_agree(exported) -> None:
    run, out, manifest = exported
    report = json.loads((run / "report.json").read_text())
    test_size = report["data"]["test_size"]
    for name, entry in manifest["models"].items():
        int8 = entry["int8"]
        assert int8["file"] == f"{name}.int8.onnx" and int8["sha256"] == sha256(str(out / int8["file"]))
        assert (out / int8["file"]).stat().st_size < (out / entry["file"]).stat().st_size / 2  # int8 weights
        v = int8["verification"]
        assert v["images"] == test_size and 0 <= v["top1_agreement"] <= 1 and v["max_abs_logit_diff"] > 0
        assert v["accuracy_change_points"] == pytest.approx(100 * (v["accuracy_int8"] - v["accuracy_fp32"]))
        # the generalist is scored on every image, an expert on the images of its classes
        assert (v["accuracy_images"] == test_size) == (name == "generalist")
    generalist = manifest["models"]["generalist"]["int8"]["verification"]
    assert generalist["accuracy_fp32"] == pytest.approx(report["generalist"]["test_acc"], abs=1e-4)
    system = manifest["verification"]["int8"]
    # with every fp32 ONNX model the system answers as the run's own evaluation did at its operating point
    assert system["system_accuracy_fp32"] == pytest.approx(report["selected"]["acc"], abs=1e-4)
    assert 0 <= system["routing_flips"] <= test_size and system["images"] == test_size


def test_an_exported_model_takes_any_batch_of_stored_images_like_pytorch(exported) -> None:
    run, out, _ = exported
    onnx.checker.check_model(str(out / "generalist.onnx"))
    session = ort.InferenceSession(str(out / "generalist.onnx"), providers=["CPUExecutionProvider"])
    model = load_classifier(str(run / "generalist" / "checkpoints" / "best.ckpt"))
    for batch in (1, 5):
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
        got = session.run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(got), model(images), atol=1e-4)


def test_one_batched_loop_runs_a_module_or_an_onnx_session(exported) -> None:
    """`batched_logits`, what export's verification, `route`, the logits cache and `partition` all run models with."""
    run, out, _ = exported
    model = load_classifier(str(run / "generalist" / "checkpoints" / "best.ckpt"))
    session = ort.InferenceSession(str(out / "generalist.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert [len(batch) for batch in in_batches(images, 3)] == [3, 3, 1]
    with torch.no_grad():
        whole = model(images).float()
    by_module = batched_logits(model, in_batches(images, 3))
    by_session = batched_logits(
        lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), in_batches(images, 3)
    )
    assert by_module.dtype == by_session.dtype == torch.float32 and by_module.shape == whole.shape
    assert torch.allclose(by_module, whole, atol=1e-5) and torch.allclose(by_session, whole, atol=1e-4)
    assert batched_logits(model, in_batches(images[:0], 3)).shape == (0, model.num_outputs)  # an empty split


def test_an_export_is_refused_when_it_disagrees_or_would_overwrite(exported, tmp_path, capsys) -> None:
    run, out, _ = exported
    target = tmp_path / "strict"
    code, _, err = run_main(["export", "--run", str(run), "--out", str(target), "--atol", "1e-12"], capsys)
    assert_clean_failure(code, err, target, "disagrees with PyTorch", "nothing was written")
    assert not list(tmp_path.iterdir())  # no staging folder left either
    code, _, err = run_main(["export", "--run", str(run), "--out", str(out)], capsys)
    assert code == 2 and "already holds files; pass --overwrite true" in err
