"""The expert server's wire format, shared by both engines (inline and LitServe) and checked before any batch.

    request  POST /predict  {"expert": "expert_2", "image": "<base64 of the stored uint8 image, 3 x S x S, C order>"}
    reply    {"expert": "expert_2", "model_version": "<12 hex>", "logits": [...], "prediction_id": 17}

The image is what the edge device holds and what the cost model counts as sent (S x S x 3 bytes; base64 adds a
third on the wire). The generalist's probabilities are not sent: the edge keeps them and fuses the expert's
logits with them itself (`fuse`, exactly as `route`), so every fusion works without them on the wire.

A request is validated against the served export's contract (its experts and image size) before it can join a
batch: one undecodable request must never fail the others batched with it.
"""

# No `from __future__ import annotations`: LitServe hands ExpertAPI.decode_request's annotation to FastAPI.
import base64
import binascii
import hmac

import numpy as np
from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

from askexpert.errors import UserError

# What clients may send: set by `serve` before any request is read (LitServe's forked HTTP process inherits it).
_CONTRACT: dict = {}


def set_contract(contract: dict) -> None:
    _CONTRACT.clear()
    _CONTRACT.update(contract)


def check_token(token: str | None) -> None:
    """A bearer token must be printable ASCII without spaces: HTTP headers carry nothing else intact."""
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
        raise UserError("the token must be printable ASCII without spaces (HTTP headers carry nothing else intact)")


def token_matches(authorization: str, token: str) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (the scheme in any case, RFC 7235)."""
    scheme, _, given = authorization.partition(" ")
    # latin-1: how the server decoded the header's bytes; a constant-time comparison of the token itself
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode("latin-1"), token.encode("latin-1"))


def image_bytes(stored_size: int) -> int:
    return 3 * stored_size * stored_size


def max_request_bytes(stored_size: int) -> int:
    """The largest body a valid request can have: the base64 image plus room for the keys and an expert name."""
    return 4 * -(-image_bytes(stored_size) // 3) + 1024


class ExpertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expert: str
    image: str
    _raw: bytes | None = PrivateAttr(default=None)  # the decoded image, kept by the validator (decoded once)

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
        self._raw = raw
        return self

    def pixels(self, stored_size: int) -> np.ndarray:
        raw = self._raw if self._raw is not None else base64.b64decode(self.image)
        return np.frombuffer(raw, dtype=np.uint8).reshape(3, stored_size, stored_size)


def short_errors(errors: list[dict]) -> list[dict]:
    """Pydantic's errors without the input: for an image that would be the whole request sent back."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:300]} for e in errors]


def reply(expert: str, version: str, logits: np.ndarray) -> dict:
    return {
        "expert": expert,
        "model_version": version,
        "logits": logits.tolist(),  # Python floats (20x faster than float() per value)
        "prediction_id": int(np.argmax(logits)),
    }
