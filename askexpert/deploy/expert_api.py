"""The experts behind LitServe: one routed endpoint, `POST /predict`, dynamically batched across experts.

Wire format (JSON; documented in the README's "Deploy"):
    request  {"expert": "expert_2", "image": "<base64 of the stored uint8 image, 3 x S x S, C order>"}
    reply    {"expert": "expert_2", "model_version": "<12 hex>", "logits": [...], "prediction_id": 17}
The image is what the edge device holds and what the cost model counts as sent (S x S x 3 bytes; base64 adds a
third on the wire). The generalist's probabilities are not sent: the edge keeps them and fuses the expert's
logits with them itself (`fuse`, exactly as `route`), so every fusion works without them on the wire.

Validation happens in LitServe's HTTP process, before a request reaches a batch: LitServe fails a whole batch
when one request in it cannot be decoded, so a malformed request must never get that far. FastAPI answers 422
for a body that is not this schema (unknown expert, wrong byte count, not base64), LitServe's size middleware
413 for an oversized one.

The worker process holds the models (ONNX Runtime sessions, torch-free) and a thread that watches the export
folder: a new manifest (e.g. `export --overwrite`) is loaded beside the old models and swapped in between two
batches, so no request is dropped and each reply names the version that answered it.
"""

# No `from __future__ import annotations`: LitServe hands `decode_request`'s annotation to FastAPI as the body type.
import base64
import binascii
import hmac
import logging
import os
import signal
import threading
import time

import litserve as ls
import numpy as np
from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, model_validator

from askexpert.deploy.bundle import load_bundle, manifest_stamp
from askexpert.deploy.metrics import metrics
from askexpert.errors import UserError

log = logging.getLogger("askexpert.serve")

# What clients may send: set by `serve` before LitServe forks its HTTP processes, which inherit it.
_CONTRACT: dict = {}


def folder_state(folder: str) -> tuple:
    """(name, size, mtime) of every file in a folder: changes when a copy into it goes on."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file())
    except OSError:
        return ()


def set_contract(contract: dict) -> None:
    _CONTRACT.clear()
    _CONTRACT.update(contract)


def image_bytes(stored_size: int) -> int:
    return 3 * stored_size * stored_size


def max_request_bytes(stored_size: int) -> int:
    """The largest body a valid request can have: the base64 image plus room for the keys and an expert name."""
    return 4 * -(-image_bytes(stored_size) // 3) + 1024


class ExpertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expert: str
    image: str

    @model_validator(mode="after")
    def _fits_the_contract(self):
        experts = _CONTRACT.get("experts", {})
        if self.expert not in experts:
            raise ValueError(f"unknown expert {self.expert!r}; this server has {', '.join(experts)}")
        try:
            raw = base64.b64decode(self.image, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image is not base64") from None
        size = _CONTRACT["stored_size"]
        if len(raw) != image_bytes(size):
            raise ValueError(f"image has {len(raw)} bytes; expected {image_bytes(size)} (uint8, 3 x {size} x {size})")
        return self


class ExpertAPI(ls.LitAPI):
    def __init__(
        self,
        export_dir: str,
        token: str | None,
        max_batch_size: int,
        batch_window_s: float,
        reload_poll_s: float = 0.5,
        threads: int = 0,
        device: str = "cpu",
        contract: dict | None = None,
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_window_s, api_path="/predict")
        self.export_dir = export_dir
        self.token = token
        self.reload_poll_s = reload_poll_s
        self.threads = threads
        self.model_device = device  # LitServe's own `device` attribute names its worker slot, not ours
        self.contract = contract  # what the HTTP process validates against (the export `serve` checked)
        self._current = None  # (bundle, {expert: session}), replaced whole on reload

    # ---- worker side -------------------------------------------------------------------------------------
    def setup(self, device):
        # Ctrl+C reaches every process of the terminal's group: the worker keeps answering while the main
        # process drains the HTTP side, then LitServe stops it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._stamp = manifest_stamp(self.export_dir)  # before reading: a newer export is then seen as new
        bundle = load_bundle(self.export_dir)
        if self.contract is not None and bundle.contract() != self.contract:
            raise UserError(f"{self.export_dir} changed while the server started; start it again")
        self._current = self._load(bundle)
        threading.Thread(target=self._watch, name="export-watcher", daemon=True).start()

    def _load(self, bundle):
        sessions = {name: bundle.session(name, self.threads, self.model_device) for name in bundle.expert_names}
        metrics()["model_loads"].labels(bundle.version).inc()
        return bundle, sessions

    def _watch(self):
        """Poll the export's manifest; load a new export beside the old one, then swap (between two batches).

        A new export that cannot be loaded is reported once and tried again only when a file in the folder
        changes (a copy still in progress finishes; a broken one is not rebuilt twice a second)."""
        failed = None
        while True:
            time.sleep(self.reload_poll_s)
            stamp = manifest_stamp(self.export_dir)
            if stamp is None or stamp == self._stamp:
                continue
            state = (stamp, folder_state(self.export_dir))
            if state == failed:
                continue
            try:
                bundle = load_bundle(self.export_dir)
                old = self._current[0]
                if bundle.version == old.version:
                    self._stamp = stamp
                    continue
                if bundle.contract() != old.contract():
                    raise UserError("its experts, classes, partition or image size differ; restart the server")
                self._current = self._load(bundle)
                self._stamp = stamp
                log.warning("loaded export version %s (was %s)", bundle.version, old.version)
            except Exception as err:  # noqa: BLE001 (anything ONNX Runtime raises on a bad file included)
                log.error("not reloading %s: %s", self.export_dir, err)
                failed = state

    def decode_request(self, request: ExpertRequest):
        size = self._current[0].stored_size
        image = np.frombuffer(base64.b64decode(request.image), dtype=np.uint8).reshape(3, size, size)
        return request.expert, image

    def predict(self, inputs):
        if isinstance(inputs, tuple):  # --max_batch_size 1: LitServe's unbatched loop hands one request
            return self.predict([inputs])[0]
        bundle, sessions = self._current  # one version answers the whole batch
        m = metrics()
        m["batch_size"].observe(len(inputs))
        outputs = [None] * len(inputs)
        for expert in sorted({name for name, _ in inputs}):
            rows = [i for i, (name, _) in enumerate(inputs) if name == expert]
            start = time.perf_counter()
            try:
                logits = sessions[expert].run(None, {"images": np.stack([inputs[i][1] for i in rows])})[0]
            except Exception:
                m["inference_errors"].labels(expert).inc()
                raise
            m["expert_seconds"].labels(expert).observe(time.perf_counter() - start)
            for j, i in enumerate(rows):
                outputs[i] = (expert, bundle.version, logits[j])
        return outputs

    def batch(self, inputs):
        return inputs  # grouped by expert in `predict`

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, output):
        expert, version, logits = output
        return {
            "expert": expert,
            "model_version": version,
            "logits": [float(v) for v in logits],
            "prediction_id": int(np.argmax(logits)),
        }

    # ---- HTTP side -------------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        """With a token, every endpoint wants `Authorization: Bearer <token>`."""
        if not self.token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")
