"""askexpert/deploy/wire.py: the expert server's request and reply, checked against the served export's contract
before a request may join a batch, and the bearer-token rules both ends share."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from askexpert.deploy import wire
from askexpert.deploy.wire import (
    ExpertRequest,
    check_token,
    image_bytes,
    max_request_bytes,
    reply,
    set_contract,
    short_errors,
    token_matches,
)
from askexpert.errors import UserError

SIZE = 8


@pytest.fixture(autouse=True)
def contract():
    """A server of two experts on 8 x 8 images; the module's contract is put back afterwards."""
    saved = dict(wire._CONTRACT)
    set_contract({"experts": {"expert_0": {}, "expert_1": {}}, "stored_size": SIZE})
    yield
    set_contract(saved)


def image(seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, size, size), dtype=np.uint8)


def encoded(pixels: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(pixels).tobytes()).decode()


def refusal(**fields) -> str:
    with pytest.raises(ValidationError) as raised:
        ExpertRequest(**fields)
    return str(raised.value)


def test_a_valid_request_gives_back_the_pixels_it_carries() -> None:
    pixels = image(1)
    request = ExpertRequest.model_validate_json(json.dumps({"expert": "expert_1", "image": encoded(pixels)}))
    assert request.expert == "expert_1"
    decoded = request.pixels(SIZE)
    assert decoded.dtype == np.uint8 and decoded.shape == (3, SIZE, SIZE)
    assert np.array_equal(decoded, pixels)


def test_requests_outside_the_contract_are_refused_one_by_one() -> None:
    good = encoded(image())
    assert "unknown expert 'expert_7'; this server has expert_0, expert_1" in refusal(expert="expert_7", image=good)
    assert "image is not base64" in refusal(expert="expert_0", image="not base64!")
    assert "image is not base64" in refusal(expert="expert_0", image=good[:-2])  # cut short
    short = base64.b64encode(bytes(10)).decode()
    assert "image has 10 bytes; expected 192 (uint8, 3 x 8 x 8)" in refusal(expert="expert_0", image=short)
    assert "image has 768 bytes; expected 192" in refusal(expert="expert_0", image=encoded(image(size=16)))
    assert "Extra inputs are not permitted" in refusal(expert="expert_0", image=good, probabilities=[0.5])
    assert "Field required" in refusal(expert="expert_0")


def test_the_contract_is_read_when_a_request_arrives() -> None:
    """`serve` sets it before the first request; LitServe's forked HTTP process inherits the module's value."""
    set_contract({"experts": {"solo": {}}, "stored_size": 2})
    assert ExpertRequest(expert="solo", image=encoded(image(size=2))).pixels(2).shape == (3, 2, 2)
    assert "this server has solo" in refusal(expert="expert_0", image=encoded(image(size=2)))


@pytest.mark.parametrize("size", [1, 2, 7, 32, 33, 224])
def test_the_largest_valid_body_fits_the_size_limit(size) -> None:
    assert image_bytes(size) == 3 * size * size
    body = json.dumps({"expert": "e" * 200, "image": encoded(image(size=size))})
    limit = max_request_bytes(size)
    assert len(body) <= limit
    assert limit - 1024 == len(encoded(image(size=size)))  # the base64 image exactly, plus 1 KiB for the rest


def test_a_reply_carries_the_logits_and_the_prediction() -> None:
    logits = np.array([0.5, -1.0, 3.25, 3.0], dtype=np.float32)
    answer = reply("expert_1", "0123456789ab", logits)
    assert answer == {
        "expert": "expert_1",
        "model_version": "0123456789ab",
        "logits": [0.5, -1.0, 3.25, 3.0],
        "prediction_id": 2,
    }
    assert all(type(v) is float for v in answer["logits"]) and type(answer["prediction_id"]) is int
    assert json.loads(json.dumps(answer)) == answer


def test_short_errors_never_echo_the_input() -> None:
    with pytest.raises(ValidationError) as raised:
        ExpertRequest(expert="nobody", image="A" * 5000)
    errors = short_errors(raised.value.errors())
    assert errors and all(set(e) == {"loc", "msg"} for e in errors)
    assert "A" * 100 not in json.dumps(errors)
    assert short_errors([{"loc": ("body", 0), "msg": "x" * 1000, "input": "secret"}]) == [
        {"loc": ["body", 0], "msg": "x" * 300}
    ]
    assert short_errors([{}]) == [{"loc": [], "msg": ""}]


@pytest.mark.parametrize("token", [None, "s3cr3t", "a-b_c.d~e+f/g=", "!#$%&'*"])
def test_tokens_that_travel_in_a_header(token) -> None:
    check_token(token)


@pytest.mark.parametrize("token", ["two words", "tök", "tab\there", "new\nline"])
def test_tokens_a_header_cannot_carry_are_refused(token) -> None:
    with pytest.raises(UserError, match=r"^the token must be printable ASCII without spaces \(HTTP headers"):
        check_token(token)


@pytest.mark.parametrize(
    "header, matches",
    [
        ("Bearer s3cr3t", True),
        ("bearer s3cr3t", True),  # the scheme in any case (RFC 7235)
        ("BEARER s3cr3t", True),
        ("Bearer S3CR3T", False),  # the token itself is compared exactly
        ("Bearer s3cr3t ", False),
        ("Basic s3cr3t", False),
        ("s3cr3t", False),
        ("Bearer", False),
        ("", False),
    ],
)
def test_token_matches(header, matches) -> None:
    assert token_matches(header, "s3cr3t") is matches
