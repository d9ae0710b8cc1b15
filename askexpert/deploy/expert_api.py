"""The LitServe engine (`serve --engine litserve`): the experts behind LitServe's LitAPI, one routed endpoint.

Validation happens in LitServe's HTTP process, before a request reaches a batch: LitServe fails a whole batch
when one request in it cannot be decoded, so a malformed request must never get that far. FastAPI answers 422
for a body that is not the wire schema (askexpert/deploy/wire.py), LitServe's size middleware 413 for an
oversized one. The worker process holds the experts (askexpert/deploy/expert_models.py: ONNX Runtime sessions,
torch-free, reloaded when the export changes).
"""

# No `from __future__ import annotations`: LitServe hands `decode_request`'s annotation to FastAPI as the body type.
import multiprocessing
import signal

import litserve as ls
from fastapi import HTTPException, Request

from askexpert.deploy.expert_models import ExpertModels
from askexpert.deploy.wire import ExpertRequest, reply, token_matches


class ExpertAPI(ls.LitAPI):
    def __init__(
        self,
        export_dir: str,
        token: str | None,
        max_batch_size: int,
        batch_window_s: float,
        threads: int = 1,
        device: str = "cpu",
        contract: dict | None = None,
        precision: str = "fp32",
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_window_s, api_path="/predict")
        self.export_dir = export_dir
        self.token = token
        self.threads = threads
        self.model_device = device  # LitServe's own `device` attribute names its worker slot, not ours
        self.contract = contract
        self.precision = precision
        self.models: ExpertModels | None = None
        # The version the model process answers with, for /info in the HTTP process. LitServe spawns the model
        # process (hence a spawn-context value, handed over with this object) and forks the HTTP one.
        self._served_version = multiprocessing.get_context("spawn").Array("c", 64)

    # ---- worker side -------------------------------------------------------------------------------------
    def setup(self, device):
        # Ctrl+C reaches every process of the terminal's group: the worker keeps answering while the main
        # process drains the HTTP side, then LitServe stops it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.models = ExpertModels(
            self.export_dir,
            self.threads,
            self.model_device,
            self.contract,
            precision=self.precision,
            on_load=self._publish_version,
        ).start()

    def _publish_version(self, version: str) -> None:
        self._served_version.value = version.encode("ascii")

    def decode_request(self, request: ExpertRequest):
        return request.expert, request.pixels(self.models.current[0].stored_size)

    def predict(self, inputs):
        if isinstance(inputs, tuple):  # --max_batch_size 1: LitServe's unbatched loop hands one request
            return self.predict([inputs])[0]
        return self.models.predict(inputs)

    def batch(self, inputs):
        return inputs  # grouped by expert in ExpertModels.predict

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, output):
        return reply(*output)

    # ---- HTTP side -------------------------------------------------------------------------------------------
    def served_version(self) -> str:
        """The version the models answer with now (empty before they first load)."""
        return self._served_version.value.decode("ascii")

    def authorize(self, request: Request) -> None:
        """With a token, every endpoint wants `Authorization: Bearer <token>`."""
        if self.token and not token_matches(request.headers.get("authorization", ""), self.token):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")
