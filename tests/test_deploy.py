"""`serve` + `edge` on loopback: real server processes, the session's tiny export, 200 stand-in images."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import REPO
from helpers.cli import run_main

from askexpert.cli import cli_main
from askexpert.deploy.batcher import Batcher
from askexpert.deploy.bundle import load_bundle
from askexpert.deploy.expert_api import ExpertAPI
from askexpert.deploy.expert_models import ExpertModels
from askexpert.files.atomic import atomic_write_text

ENGINES = ("inline", "litserve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m askexpert serve` as a real process group (the LitServe engine forks HTTP and model processes)."""

    def __init__(self, export, cwd, *extra: str, port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "askexpert", "serve", "--export", str(export), "--port", str(self.port)]
        self.log = open(os.path.join(cwd, f"serve-{self.port}.log"), "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [*command, *extra],
            cwd=cwd,
            # TMPDIR: the server's metrics folder lands in the test's folder (a killed server cannot remove it)
            env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(cwd), **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, headers: dict | None = None, timeout_s: float = 90) -> Server:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, open(self.log.name).read()
            try:
                if httpx.get(f"{self.url}/health", headers=headers, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout_s} s: {open(self.log.name).read()}")

    def kill(self) -> None:
        """Kill the whole group at once, as a crash or a pulled plug would."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.log.close()


def request(expert: str, image: np.ndarray) -> dict:
    return {"expert": expert, "image": base64.b64encode(image.tobytes()).decode()}


def random_image(size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, size, size), dtype=np.uint8)


def predict_total(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('askexpert_requests_total{path="/predict",status="200"}')
    )


@pytest.fixture(scope="module")
def images(tiny_pipeline_run, tmp_path_factory):
    """The tiny run's 200 test images as PNG files in folders named after their classes."""
    from PIL import Image

    from askexpert.pipeline.finished_run import read_settings
    from datamodules.datamodule import ImageDataModule

    _, run = tiny_pipeline_run
    datamodule = ImageDataModule(**read_settings(str(run)).data.as_dict())
    pixels, labels = datamodule.tensors("test")[:2]
    folder = tmp_path_factory.mktemp("edge_images")
    for i in range(200):
        target = folder / datamodule.class_names[int(labels[i])]
        target.mkdir(exist_ok=True)
        Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).save(target / f"{i}.png")
    return folder


@pytest.fixture(scope="module", params=ENGINES)
def served(request, tiny_export, tmp_path_factory):
    """A server of each engine on a copy of the session's export (the reload test rewrites the copy's manifest)."""
    folder = tmp_path_factory.mktemp(f"served_{request.param}")
    export = folder / "export"
    shutil.copytree(tiny_export[0], export)
    server = Server(export, folder, "--engine", request.param).wait_ready()
    yield server, export, folder
    server.kill()


def read_csv(path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def test_edge_answers_like_route_survives_a_dead_server_and_resumes(
    tiny_pipeline_run, tiny_export, images, tmp_path, capsys
):
    _, run = tiny_pipeline_run
    export = tiny_export[0]
    server = Server(export, tmp_path).wait_ready()
    edge = ["edge", "--export", str(export), "--server", server.url, "--images", str(images)]
    try:
        summary = cli_main([*edge, "--out", str(tmp_path / "edge.csv")])
        cli_main(["route", "--run", str(run), "--images", str(images), "--out", str(tmp_path / "route.csv")])
        got, expected = read_csv(tmp_path / "edge.csv"), read_csv(tmp_path / "route.csv")
        assert len(got) == 200 and got.keys() == expected.keys()
        assert summary["fallbacks"] == 0 and summary["offloaded"] > 0 and summary["labelled"] == 200
        for name, row in got.items():
            for column in ("prediction", "offloaded", "expert"):
                assert row[column] == expected[name][column], (name, column)
            assert float(row["latency_ms"]) > 0 and row["fallback"] == "False"
        assert {row["model_version"] for row in got.values() if row["offloaded"] == "True"} == {
            load_bundle(str(export)).version
        }
        lat = summary["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        summary_file = json.loads((tmp_path / "edge.summary.json").read_text())
        assert summary_file["images"] == 200 and summary_file["offload_ratio"] == summary["offload_ratio"]

        # the server dies mid-run: every image is still answered, by the generalist, and the breakers open
        killer = threading.Thread(target=_kill_after_requests, args=(server, 10))
        killer.start()
        summary = cli_main([*edge, "--out", str(tmp_path / "dead.csv"), "--concurrency", "1"])
        killer.join()
        dead = read_csv(tmp_path / "dead.csv")
        assert len(dead) == 200 and summary["fallbacks"] > 0 and summary["breaker_openings"] >= 1
        fell_back = [row for row in dead.values() if row["fallback"] == "True"]
        assert all(row["offloaded"] == "True" and row["error"] for row in fell_back)
        assert all(row["prediction"] == row["generalist_prediction"] for row in fell_back)
        # the breakers stop asking a dead server: far fewer requests than fallbacks
        assert summary["requests_sent"] - (summary["offloaded"] - summary["fallbacks"]) < summary["fallbacks"] / 2

        # after a restart on the same port, offloading resumes
        server = Server(export, tmp_path, port=server.port).wait_ready()
        summary = cli_main([*edge, "--out", str(tmp_path / "again.csv")])
        assert summary["fallbacks"] == 0 and summary["offloaded"] > 0
    finally:
        server.kill()
    assert not (tmp_path / "client.py").exists()  # LitServe's client file is never written


def _kill_after_requests(server: Server, answered: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if predict_total(httpx.get(f"{server.url}/metrics", timeout=1).text) >= answered:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    server.kill()


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(served):
    server, _, _ = served
    good = request("expert_0", random_image())
    with httpx.Client(base_url=server.url) as client:
        bad = {
            "not json": dict(content=b"{not json", headers={"content-type": "application/json"}),
            "a list": dict(json=[1, 2]),
            "unknown expert": dict(json={**good, "expert": "expert_7"}),
            "extra key": dict(json={**good, "probs": [0.1]}),
            "not base64": dict(json={**good, "image": "%%%"}),
            "wrong shape": dict(json=request("expert_0", random_image(16))),
            "oversized": dict(json={**good, "image": "A" * 400_000}),
        }
        for case, kwargs in bad.items():
            response = client.post("/predict", **kwargs)
            assert 400 <= response.status_code < 500, case
            assert len(response.content) < 2000, case  # the error does not echo the image back
            reply = client.post("/predict", json=good)
            assert reply.status_code == 200, case
        assert client.post("/predict", json={**good, "image": "A" * 400_000}).status_code == 413
        reply = reply.json()
        assert reply["expert"] == "expert_0" and len(reply["logits"]) == 100 and len(reply["model_version"]) == 12


def test_metrics_rise_with_traffic(served):
    server, _, _ = served
    with httpx.Client(base_url=server.url) as client:
        before = client.get("/metrics").text
        for i in range(5):
            assert client.post("/predict", json=request(f"expert_{i % 2}", random_image())).status_code == 200
        after = client.get("/metrics").text
    assert predict_total(after) == predict_total(before) + 5
    for name in ("askexpert_batch_size_count", 'askexpert_expert_seconds_count{expert="expert_1"}'):
        assert name in after
    assert "askexpert_model_loads_total" in after


def test_a_new_export_is_loaded_without_a_failed_request(served):
    server, export, _ = served
    image = random_image()
    with httpx.Client(base_url=server.url) as client:
        old = client.post("/predict", json=request("expert_1", image)).json()
        manifest = json.loads((export / "manifest.json").read_text())
        manifest["note"] = "a new export"  # another manifest is another version, even with the same weights
        statuses, versions = [], []

        def hammer(stop: threading.Event):
            while not stop.is_set():
                reply = client.post("/predict", json=request("expert_1", image))
                statuses.append(reply.status_code)
                versions.append(reply.json().get("model_version"))

        stop = threading.Event()
        thread = threading.Thread(target=hammer, args=(stop,))
        thread.start()
        time.sleep(0.3)
        atomic_write_text(str(export / "manifest.json"), json.dumps(manifest))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not versions or versions[-1] == old["model_version"]):
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        thread.join()
    assert set(statuses) == {200}
    assert versions[0] == old["model_version"] != versions[-1]
    assert versions == sorted(versions, key=lambda v: v != old["model_version"])  # one switch, never back


def test_an_edge_with_another_export_falls_back_instead_of_mixing_systems(served, tiny_export, images, tmp_path):
    server, export, _ = served
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["note"] = "another export for the edge test"
    atomic_write_text(str(export / "manifest.json"), json.dumps(manifest))
    mine = load_bundle(str(tiny_export[0])).version
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        reply = httpx.post(f"{server.url}/predict", json=request("expert_0", random_image())).json()
        if reply["model_version"] != mine:
            break
        time.sleep(0.1)
    out = tmp_path / "mixed.csv"
    summary = cli_main(
        ["edge", "--export", str(tiny_export[0]), "--server", server.url, "--images", str(images), "--out", str(out)]
    )
    assert summary["offloaded"] > 0 and summary["fallbacks"] == summary["offloaded"]
    assert all(why.startswith("server holds export version") for why in summary["fallback_reasons"])


def test_one_request_batches_and_lists_give_the_same_answers():
    """`--max_batch_size 1` makes LitServe hand `predict` one request instead of a list."""

    class Session:
        def run(self, _, feeds):
            return [feeds["images"].reshape(len(feeds["images"]), -1)[:, :4].astype(np.float32)]

    class Bundle:
        version = "v1"

    api = ExpertAPI("unused", None, max_batch_size=1, batch_window_s=0.0)
    api.models = ExpertModels("unused")
    api.models.current = (Bundle(), {"expert_0": Session(), "expert_1": Session()})
    images = [random_image(), random_image()[::-1].copy()]
    one = api.predict(("expert_1", images[1]))
    both = api.predict([("expert_0", images[0]), ("expert_1", images[1])])
    assert one[0] == both[1][0] == "expert_1" and np.array_equal(one[2], both[1][2])
    assert api.encode_response(one)["prediction_id"] == int(np.argmax(one[2]))


def test_the_default_server_is_not_reachable_from_another_address(served):
    server, _, _ = served
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: this picks the outward interface
            address = probe.getsockname()[0]
    except OSError:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(OSError):
        socket.create_connection((address, server.port), timeout=2).close()
    socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_drains_in_flight_requests_and_a_token_guards_every_endpoint(
    engine, tiny_export, images, tmp_path, capsys
):
    token = {"Authorization": "Bearer s3cret"}
    # a long batch window keeps the requests in flight when SIGTERM arrives
    server = Server(
        tiny_export[0],
        tmp_path,
        "--engine",
        engine,
        "--batch_window_ms",
        "1500",
        "--max_batch_size",
        "64",
        env={"ASKEXPERT_TOKEN": "s3cret"},
    )
    try:
        server.wait_ready(headers=token)
        assert httpx.get(f"{server.url}/health").status_code == 401
        assert httpx.get(f"{server.url}/health", headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert httpx.post(f"{server.url}/predict", json=request("expert_0", random_image())).status_code == 401
        edge = ["edge", "--export", str(tiny_export[0]), "--server", server.url, "--images", str(images)]
        code, _, err = run_main([*edge, "--out", str(tmp_path / "no_token.csv")], capsys)
        assert code == 2 and "refused the token" in err and not (tmp_path / "no_token.csv").exists()
        with ThreadPoolExecutor(8) as pool:
            replies = [
                pool.submit(
                    httpx.post,
                    f"{server.url}/predict",
                    json=request("expert_0", random_image()),
                    headers=token,
                    timeout=30,
                )
                for _ in range(8)
            ]
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            assert [r.result().status_code for r in replies] == [200] * 8
        assert server.process.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", headers=token, timeout=2)
    finally:
        server.kill()


def test_serve_and_edge_refuse_bad_options_in_one_line(tiny_export, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ASKEXPERT_TOKEN", raising=False)
    export = str(tiny_export[0])
    cases = {
        ("serve", "--export", export, "--host", "0.0.0.0"): "give a token",
        ("serve", "--export", export, "--host", "::1", "--engine", "litserve"): "binds 127.0.0.1, 0.0.0.0 or ::",
        ("serve", "--export", export, "--host", "192.0.2.77", "--token", "x"): "cannot listen on 192.0.2.77",
        ("serve", "--export", export, "--host", "my-laptop"): "must be an IP address",
        ("serve", "--export", export, "--engine", "triton"): "--engine must be one of inline, litserve",
        ("serve", "--export", export, "--batch_window_ms", "1e13"): "--batch_window_ms must be at most 10000",
        ("serve", "--export", export, "--batch_window_ms", "3000", "--timeout_s", "2"): "shorter than --timeout_s",
        ("serve", "--export", export, "--token", "pässwort"): "printable ASCII",
        ("serve", "--export", export, "--port", "80"): "between 1024 and 65535",
        ("serve", "--export", export, "--log_level", "loud"): "--log_level must be one of",
        ("serve", "--export", export, "--device", "gpu"): "--device must be cpu, cuda or auto",
        ("serve", "--export", str(tmp_path / "none")): "export folder not found",
        ("serve", "--export", str(tmp_path)): "has no manifest.json",
        ("edge", "--export", export, "--server", "127.0.0.1:1", "--images", str(tmp_path), "--out", "x.csv"): "URL",
        ("edge", "--export", export, "--server", "http://", "--images", str(tmp_path), "--out", "x.csv"): "URL",
        ("edge", "--export", export, "--server", "http://x", "--images", str(tmp_path / "no"), "--out", "x.csv"): (
            "image folder not found"
        ),
    }
    for argv, message in cases.items():
        code, _, err = run_main(list(argv), capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    damaged = tmp_path / "damaged"
    shutil.copytree(export, damaged)
    with open(damaged / "expert_1.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 16)
    code, _, err = run_main(["serve", "--export", str(damaged)], capsys)
    assert code == 2 and "does not match the SHA-256 in its manifest" in err
    (damaged / "manifest.json").write_text("{")
    code, _, err = run_main(["serve", "--export", str(damaged)], capsys)
    assert code == 2 and "damaged or not an askexpert manifest" in err


def test_the_batcher_waits_its_window_closes_full_batches_and_skips_abandoned_requests():
    seen: list[list[int]] = []

    def run_batch(items):
        seen.append(list(items))
        if -1 in items:
            raise ValueError("the model failed")
        return [10 * i for i in items]

    batcher = Batcher(run_batch, max_batch_size=3, window_s=0.3)
    try:
        start = time.monotonic()
        assert batcher.submit(1).result(timeout=5) == 10
        assert 0.3 <= time.monotonic() - start < 2  # one request waits the whole window for company
        futures = [batcher.submit(i) for i in (2, 3, 4, 5)]
        assert [f.result(timeout=5) for f in futures] == [20, 30, 40, 50]
        assert seen[1:] == [[2, 3, 4], [5]]  # a full batch goes at once, the rest waits for its own window
        abandoned = batcher.submit(6)
        assert abandoned.cancel()  # its caller gave up (timeout) before the batch ran: never computed
        assert batcher.submit(7).result(timeout=5) == 70 and seen[-1] == [7]
        with pytest.raises(ValueError, match="the model failed"):
            batcher.submit(-1).result(timeout=5)
        assert batcher.submit(8).result(timeout=5) == 80  # the thread goes on after a failed batch
        late = [batcher.submit(i) for i in (9, 10)]
    finally:
        batcher.close(timeout_s=5)
    assert [f.result(timeout=0) for f in late] == [90, 100]  # closing answers what is queued
    assert not batcher.alive
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(11)


def test_experts_of_one_batch_run_side_by_side_and_answer_in_order(monkeypatch):
    class Session:
        def __init__(self, offset):
            self.offset = offset

        def run(self, _, feeds):
            time.sleep(0.2)  # a model call: the GIL is free meanwhile, as in ONNX Runtime
            return [feeds["images"].reshape(len(feeds["images"]), -1)[:, :2].astype(np.float32) + self.offset]

    class Bundle:
        version = "v1"
        expert_names = ["expert_0", "expert_1", "expert_2"]

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    models = ExpertModels("unused", threads=1)
    models.current = (Bundle(), {name: Session(100 * k) for k, name in enumerate(Bundle.expert_names)})
    from concurrent.futures import ThreadPoolExecutor as Pool

    models._pool = Pool(3)
    items = [(f"expert_{k % 3}", np.full((3, 2, 2), k, dtype=np.uint8)) for k in range(6)]
    start = time.monotonic()
    outputs = models.predict(items)
    assert time.monotonic() - start < 0.55  # three experts at once: about one model call, not three
    assert [(e, float(logits[0])) for e, _, logits in outputs] == [
        (f"expert_{k % 3}", 100 * (k % 3) + k) for k in range(6)
    ]


def test_serve_and_edge_run_the_int8_copies_when_asked(tiny_export, images, tmp_path, capsys):
    export = tiny_export[0]
    server = Server(export, tmp_path, "--precision", "int8").wait_ready()
    try:
        info = httpx.get(f"{server.url}/info").json()
        assert info["server"]["precision"] == "int8"
        reply = httpx.post(f"{server.url}/predict", json=request("expert_1", random_image())).json()
        int8 = load_bundle(str(export)).session("expert_1", 1, precision="int8")
        expected = int8.run(None, {"images": random_image()[None]})[0][0]
        assert np.allclose(reply["logits"], expected, atol=1e-5)  # the int8 file answered, not the fp32 one
        edge = ["edge", "--export", str(export), "--server", server.url, "--images", str(images)]
        summary = cli_main([*edge, "--out", str(tmp_path / "int8.csv"), "--precision", "int8"])
        assert summary["fallbacks"] == 0 and summary["images"] == 200
    finally:
        server.kill()
    stripped = tmp_path / "fp32_only"
    shutil.copytree(export, stripped)
    manifest = json.loads((stripped / "manifest.json").read_text())
    for entry in manifest["models"].values():
        del entry["int8"]
    (stripped / "manifest.json").write_text(json.dumps(manifest))
    for argv in (
        ["serve", "--export", str(stripped), "--precision", "int8"],
        ["edge", "--export", str(stripped), "--server", "http://127.0.0.1:1", "--images", str(images), "--out", "x.csv"]
        + ["--precision", "int8"],
        ["serve", "--export", str(export), "--precision", "fp16"],
    ):
        code, _, err = run_main(argv, capsys)
        assert code == 2 and ("no int8 models" in err or "--precision must be fp32 or int8" in err), (argv, err)


def test_a_stalled_upload_gets_408_and_does_not_hold_the_drain(tiny_export, tmp_path):
    server = Server(tiny_export[0], tmp_path, "--timeout_s", "1", "--batch_window_ms", "0").wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stalled:
            head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            stalled.sendall(head.encode() + b"{}")  # 2 of the 100 bytes promised, then nothing
            start = time.monotonic()
            answer = stalled.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5, answer
        reply = httpx.post(f"{server.url}/predict", json=request("expert_0", random_image()))
        assert reply.status_code == 200
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as another:
            another.sendall(head.encode())
            time.sleep(0.2)
            start = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=20) == 0 and time.monotonic() - start < 5
    finally:
        server.kill()
