"""Records read by range (issue 27, items 7-10): the export manifest, the run's report.json, the model files an
export lists and a device profile. Each damaged file is refused in one line that names it (and the field), where
the file is read, instead of an IndexError, a protobuf traceback or a router that silently offloads nothing."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
from helpers.cli import one_line, run_main

from askexpert.collab import routing
from askexpert.deploy import manifest_checks
from askexpert.deploy.bundle import load_bundle
from askexpert.errors import UserError

ENGINES = ("inline", "litserve")


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    """A copy of the session's export, to damage."""
    folder = tmp_path / "export"
    shutil.copytree(tiny_export[0], folder)
    return folder


@pytest.fixture
def run_copy(tiny_pipeline_run, tmp_path):
    """A copy of the session's finished run, to damage."""
    _, source = tiny_pipeline_run
    folder = tmp_path / "run"
    shutil.copytree(source, folder, symlinks=True)
    return folder


@pytest.fixture
def edge_images(tmp_path):
    """Two PNG images in a folder (the edge refuses before it classifies any)."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(folder / f"{i}.png")
    return folder


def edit_manifest(folder, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def replace_model(folder, name: str, data: bytes) -> None:
    """Swap a model file for `data` and record its hash, so that only the contents are wrong."""
    (folder / f"{name}.onnx").write_bytes(data)
    edit_manifest(folder, lambda m: m["models"][name].update(sha256=hashlib.sha256(data).hexdigest()))


def edge_argv(export, images, tmp_path) -> list[str]:
    out = str(tmp_path / "e.csv")
    return ["edge", "--export", str(export), "--server", "http://127.0.0.1:9", "--images", str(images), "--out", out]


# -- item 7: the manifest -----------------------------------------------------------------------------------------
DAMAGED_MANIFESTS = {
    "a partition id of 150": (
        lambda m: m["partition"]["experts"][0].append(150),
        "partition.experts[0][50] (a class id of 100 classes) must be in [0, 99], got 150",
    ),
    "class_names shorter than the classes": (
        lambda m: m["class_names"].pop(),
        "class_names must name the 100 classes of models.generalist.output.shape, got 99 names",
    ),
    "a NaN threshold": (
        lambda m: m["operating_point"].update(threshold=math.nan),
        "operating_point.threshold must be a finite number, got nan",
    ),
    "a threshold of 5": (
        lambda m: m["operating_point"].update(threshold=5),
        "operating_point.threshold must be in [0, 1], got 5",
    ),
    "a temperature of 0": (
        lambda m: m["operating_point"].update(temperature_value=0),
        "operating_point.temperature_value must be above 0, got 0",
    ),
    "an infinite temperature": (
        lambda m: m["operating_point"].update(temperature_value=math.inf),
        "operating_point.temperature_value must be a finite number, got inf",
    ),
    "top_k past the classes": (
        lambda m: m["operating_point"].update(top_k=101),
        "operating_point.top_k (100 classes) must be in [1, 100], got 101",
    ),
    "an unknown gate": (
        lambda m: m["operating_point"].update(gate="vibes"),
        "operating_point.gate must be one of max_prob, margin, entropy, got 'vibes'",
    ),
    "a second expert's margin of 2": (
        lambda m: m["operating_point"].update(second_expert={"margin": 2, "fusion": "mass"}),
        "operating_point.second_expert.margin must be in [0, 1], got 2",
    ),
    "an image size of 0": (
        lambda m: m["models"]["generalist"]["input"].update(shape=["batch", 3, 0, 0]),
        "models.generalist.input.shape's image size must be at least 1, got 0",
    ),
    "an expert as wide as an extra class": (
        lambda m: m["models"]["expert_1"]["output"].update(shape=["batch", 101]),
        "models.expert_1.output.shape must end in 100 (one logit per 100 classes), got 101",
    ),
    "an expert model for no subset": (
        lambda m: m["partition"]["experts"].pop(),
        "partition.num_experts must be 1, the subsets listed, got 2",
    ),
    "a model file outside the folder": (
        lambda m: m["models"]["expert_0"].update(file="../expert_0.onnx"),
        "models.expert_0.file must be a file name inside the export folder, got '../expert_0.onnx'",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_MANIFESTS))
def test_edge_refuses_a_manifest_out_of_range_in_one_line_naming_the_file_and_field(
    case, export_copy, edge_images, tmp_path, capsys
):
    change, message = DAMAGED_MANIFESTS[case]
    edit_manifest(export_copy, change)
    code, _, err = run_main(edge_argv(export_copy, edge_images, tmp_path), capsys)
    one_line(code, err, f"{export_copy / 'manifest.json'} is damaged: {message}; export the run again")
    assert not (tmp_path / "e.csv").exists()


def test_serve_refuses_a_manifest_out_of_range_before_it_listens(export_copy, capsys):
    """The server reads the same manifest through the same reader: a partition id past the classes is refused."""
    edit_manifest(export_copy, lambda m: m["partition"]["experts"][1].append(100))
    code, _, err = run_main(["serve", "--export", str(export_copy)], capsys)
    one_line(code, err, "partition.experts[1][50] (a class id of 100 classes) must be in [0, 99], got 100")


def test_the_manifest_reader_knows_the_routers_names():
    """The torch-free manifest checks keep the router's gate and fusion names as data: they must be the router's."""
    assert manifest_checks.GATES == routing.GATES
    assert manifest_checks.FUSIONS == routing.FUSIONS
    assert manifest_checks.SECOND_FUSIONS == routing.SECOND_FUSIONS


def test_a_good_manifest_still_loads(tiny_export):
    bundle = load_bundle(str(tiny_export[0]))
    assert bundle.expert_names == ["expert_0", "expert_1"] and len(bundle.class_names) == 100


# -- item 9: a model file that is not ONNX ------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_serve_refuses_a_model_file_that_is_not_onnx_in_one_line(engine, export_copy, capsys):
    replace_model(export_copy, "expert_1", b"this is not an ONNX model\n")
    code, _, err = run_main(["serve", "--export", str(export_copy), "--engine", engine], capsys)
    one_line(code, err, f"ONNX Runtime cannot load {export_copy / 'expert_1.onnx'}: not an ONNX model", "export again")


def test_edge_refuses_a_generalist_file_that_is_not_onnx_in_one_line(export_copy, edge_images, tmp_path, capsys):
    replace_model(export_copy, "generalist", (export_copy / "manifest.json").read_bytes())
    code, _, err = run_main(edge_argv(export_copy, edge_images, tmp_path), capsys)
    one_line(code, err, f"ONNX Runtime cannot load {export_copy / 'generalist.onnx'}: not an ONNX model")
    assert not (tmp_path / "e.csv").exists()


def test_a_loadable_model_of_another_shape_is_refused_where_its_session_is_made(export_copy):
    """An ONNX file ONNX Runtime loads, but not the manifest's model: float input of another name."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 100])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 100])],
    )
    replace_model(export_copy, "expert_0", helper.make_model(graph).SerializeToString())
    with pytest.raises(UserError, match=r"expert_0.onnx takes x \['batch', 100\] tensor\(float\), not the manifest's"):
        load_bundle(str(export_copy)).session("expert_0")


# -- item 8: report.json ------------------------------------------------------------------------------------------
DAMAGED_REPORTS = {
    "a threshold of 5": (lambda r: r["selected"].update(threshold=5), "selected.threshold must be in [0, 1], got 5"),
    "a NaN threshold": (
        lambda r: r["selected"].update(threshold=math.nan),
        "selected.threshold must be a finite number, got nan",
    ),
    "a temperature of 0": (
        lambda r: r["routing"].update(temperature_value=0),
        "routing.temperature_value must be above 0, got 0",
    ),
    "an infinite temperature": (
        lambda r: r["routing"].update(temperature_value=math.inf),
        "routing.temperature_value must be a finite number, got inf",
    ),
    "top_k 0": (lambda r: r["routing"].update(top_k=0), "routing.top_k (100 classes) must be in [1, 100], got 0"),
    "an unknown fusion": (
        lambda r: r["routing"].update(fusion="vote"),
        "routing.fusion must be one of expert, product, mean, got 'vote'",
    ),
    "a second expert's margin of -1": (
        lambda r: r.update(second_expert={"threshold": 0.1, "margin": -1, "fusion": "mass"}),
        "second_expert.margin must be in [0, 1], got -1",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_REPORTS))
def test_route_refuses_a_report_out_of_range_naming_the_file_field_and_command(
    case, run_copy, edge_images, tmp_path, capsys
):
    change, message = DAMAGED_REPORTS[case]
    report = json.loads((run_copy / "report.json").read_text())
    change(report)
    (run_copy / "report.json").write_text(json.dumps(report))
    argv = ["route", "--run", str(run_copy), "--images", str(edge_images), "--out", str(tmp_path / "r.csv")]
    code, _, err = run_main(argv, capsys)
    rewrite = f"write it again with `python -m askexpert evaluate --run {run_copy}`"
    one_line(code, err, f"{run_copy / 'report.json'} is damaged: {message}; {rewrite}")
    assert not (tmp_path / "r.csv").exists()


def test_export_and_adapt_read_the_report_through_the_same_checks(run_copy, tmp_path, capsys):
    """export (its operating point and model card) and adapt's routing come from the one reader too."""
    from askexpert.adapt.measure import run_routing

    report = json.loads((run_copy / "report.json").read_text())
    report["routing"]["temperature_value"] = -2.0
    (run_copy / "report.json").write_text(json.dumps(report))
    code, _, err = run_main(["export", "--run", str(run_copy), "--out", str(tmp_path / "x")], capsys)
    one_line(code, err, "routing.temperature_value must be above 0, got -2.0", "evaluate --run")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="routing.temperature_value must be above 0"):
        run_routing(str(run_copy))
    (run_copy / "report.json").write_bytes(b'{"routing": "\xff"}')
    with pytest.raises(UserError, match=r"report.json is damaged \(not UTF-8 text\); write it again"):
        run_routing(str(run_copy))


# -- item 10: files that are not UTF-8 ----------------------------------------------------------------------------
def test_a_profile_that_is_not_utf8_is_one_line(tmp_path, capsys):
    profile = tmp_path / "profile.yaml"
    profile.write_bytes(b"edge:\n  name: \xff\xfe pi\n")
    argv = ["profile", "--base_profile", str(profile), "--out", str(tmp_path / "p.yaml")]
    code, _, err = run_main([*argv, "--models", "vit_micro_patch8_32"], capsys)
    one_line(code, err, f"device profile {profile} is not UTF-8 text")


def test_a_profile_nested_too_deeply_is_one_line(tmp_path):
    from askexpert.collab.costs import load_profile

    profile = tmp_path / "deep.yaml"
    profile.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(UserError, match="is not valid YAML: nested too deeply"):
        load_profile(str(profile))


@pytest.mark.parametrize("option", ["--config", "--data"])
def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(option, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"max_epochs: \xff\n")
    code, _, err = run_main(["fit", option, str(config)], capsys)
    one_line(code, err, f"config file {config} is not UTF-8 text")
    code, _, err = run_main(["partition", "--config", str(config)], capsys)
    one_line(code, err, f"config file {config} is not UTF-8 text")


def test_a_manifest_that_is_not_utf8_is_one_line(export_copy, capsys):
    (export_copy / "manifest.json").write_bytes(b'{"format_version": 1, "x": "\xff"}')
    code, _, err = run_main(["serve", "--export", str(export_copy)], capsys)
    one_line(code, err, "manifest.json is damaged or not an askexpert manifest (not UTF-8 text)")


# -- the routing options askexpert writes into a report, checked by the rule that reads them back ----------------
ROUTING_VALUES = {
    "a negative seed": ({"seed": -1}, False),
    "a seed past torch's generator": ({"seed": 2**64}, False),
    "the largest seed": ({"seed": 2**64 - 1}, True),
    "an infinite latency budget": ({"budget": {"latency_ms": math.inf}}, False),
    "a NaN energy budget": ({"budget": {"energy_mj": math.nan}}, False),
    "a constrained offload of 2": ({"constrained": {"offload_ratio": 2.0}}, False),
    "a latency budget of 5 ms": ({"budget": {"latency_ms": 5.0}}, True),
}


@pytest.mark.parametrize("case", sorted(ROUTING_VALUES))
def test_routing_options_and_the_report_reader_follow_one_rule(tiny_pipeline_run, case):
    """What `--routing.*` accepts is what report.json is read back with: askexpert never writes a report that it
    then refuses (`--routing.seed -1` was accepted, and the report it wrote refused)."""
    from askexpert.collab.report_file import check_report
    from askexpert.collab.system import RoutingConfig
    from askexpert.files.fields import BadField

    _, run = tiny_pipeline_run
    change, valid = ROUTING_VALUES[case]
    report = json.loads((run / "report.json").read_text())
    report["routing"].update(change)
    config = RoutingConfig(**change)
    if valid:
        config.check(100)
        check_report(report)
    else:
        with pytest.raises(UserError):
            config.check(100)
        with pytest.raises(BadField):
            check_report(report)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--routing.seed", "-1"], "--routing.seed must be at least 0, got -1"),
        (["--routing.budget.latency_ms", ".inf"], "budget latency_ms must be a finite number, got inf"),
        (["--routing.constrained.energy_mj", ".nan"], "constrained budget energy_mj must be a finite number, got nan"),
    ],
)
def test_evaluate_refuses_routing_options_whose_report_would_be_refused(run_copy, tmp_path, capsys, extra, message):
    code, _, err = run_main(["evaluate", "--run", str(run_copy), "--out", str(tmp_path / "e"), *extra], capsys)
    one_line(code, err, message)
    assert not (tmp_path / "e").exists()
