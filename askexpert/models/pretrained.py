"""Pretrained weights for any timm model: a local file (offline) or timm's published weights (online).

Both go through timm's own loading path (`timm.models.load_pretrained`): the model's checkpoint filter converts
the file's layout and resamples position embeddings (and patch embeddings) to the model's image and patch grid,
and a classifier of another class count is dropped so the new head keeps its fresh initialisation. What askexpert
adds is what timm leaves to the caller:

- the file is read without running anything from it (safetensors, or `torch.load(weights_only=True)` through
  `askexpert.files.checkpoints.load_checkpoint`), whatever it is: a plain state dict, a timm training checkpoint
  (`state_dict`, `state_dict_ema`, `model`) or a Lightning checkpoint of any askexpert module (`net.` prefix);
- the file is checked against the architecture before anything is loaded: timm loads non-strictly once the
  head is dropped, so a file of another architecture would otherwise load "successfully" with most weights
  left random. Anything missing or unexpected besides the classifier is refused in one line naming it;
- a network that is not there is found in a second (a socket probe) instead of after a minute of download
  retries, and the answer says how to supply a file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import timm
import torch
from timm.models import clean_state_dict, load_pretrained

from askexpert.errors import UserError
from askexpert.files.checkpoints import load_checkpoint

HUB_HOST = ("huggingface.co", 443)
# keys a training checkpoint keeps its weights under, most preferred first (timm's own reader prefers EMA too)
_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# prefixes a whole state dict may carry: askexpert/Lightning modules (`net.`), wrappers (`module.`, `model.`)
_PREFIXES = ("net.", "module.", "model.")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights in `path` as a plain state dict, read without running any code from the file."""
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"cannot read pretrained weights {path}: {str(err).splitlines()[0]}") from None
    else:
        checkpoint = load_checkpoint(path)
        state = checkpoint
        for key in _NESTED_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        if checkpoint.get("askexpert_class") and isinstance(state, dict):
            # an askexpert module's state dict also holds its metrics' buffers (`val_metrics.*`): the network is
            # what is under `net.`, and only that is a model's weights
            state = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("net.")}
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(
            f"{path} holds no state dict of tensors (a safetensors file, a state dict, or a timm or "
            "Lightning checkpoint)"
        )
    state = clean_state_dict(state)  # timm's: drops a `module.` prefix
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def file_normalisation(path: str) -> tuple[list[float], list[float]] | None:
    """The input mean/std an askexpert (Lightning) checkpoint recorded, so a model started from it keeps them."""
    if path.endswith(".safetensors"):
        return None
    hparams = load_checkpoint(path, mmap=True).get("hyper_parameters") or {}
    mean, std = hparams.get("mean"), hparams.get("std")
    return (list(mean), list(std)) if mean and std else None


def classifier_names(net: torch.nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s), as the model's pretrained config declares them."""
    names = net.pretrained_cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def head_classes(state: dict[str, torch.Tensor], classifiers: tuple[str, ...]) -> int:
    """Class count of the file's head: 0 for a headless file (a feature extractor)."""
    for name in classifiers:
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return 0


def checkpoint_filter(model_name: str):
    """The checkpoint filter timm's builder uses for `model_name`: by timm's convention, `checkpoint_filter_fn` of
    the module that registers the model (timm keeps no reference to it on the built model)."""
    entrypoint = timm.models.model_entrypoint(model_name.split(".")[0])
    return getattr(sys.modules[entrypoint.__module__], "checkpoint_filter_fn", None)


def _describe(keys: list[str]) -> str:
    return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"


def check_fits(net: torch.nn.Module, model_name: str, state: dict[str, torch.Tensor], path: str) -> dict:
    """The filtered state dict, or one line saying why the file does not fit the architecture."""
    what = f"pretrained weights {path} do not fit {model_name}"
    filter_fn = checkpoint_filter(model_name)
    filtered = dict(state)
    if filter_fn is not None:
        try:
            filtered = filter_fn(dict(state), net)
        except Exception as err:  # the filter of another architecture's layout fails in many ways
            raise UserError(f"{what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    head = {f"{name}.{suffix}" for name in classifier_names(net) for suffix in ("weight", "bias")}
    expected = net.state_dict()
    # torch fills in a BatchNorm's step counter when a file leaves it out (torchvision's weights do)
    missing = [k for k in expected if k not in filtered and k not in head and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in filtered if k not in expected and k not in head]
    wrong = [
        f"{k} {tuple(filtered[k].shape)} vs {tuple(expected[k].shape)}"
        for k in filtered
        if k in expected and k not in head and filtered[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected {_describe(unexpected)}")
        if wrong:
            parts.append(f"other shapes {_describe(wrong)}")
        raise UserError(f"{what}: {'; '.join(parts)}")
    return filtered


def load_file_weights(net: torch.nn.Module, model_name: str, path: str, num_classes: int) -> str:
    """Load the backbone (and a head of the right size) from `path` into `net`; returns what was done."""
    state = read_state_dict(path)
    filtered = check_fits(net, model_name, state, path)
    classifiers = classifier_names(net)
    file_classes = head_classes(filtered, classifiers)
    # timm drops the head when the class counts differ (or the file has none) and loads the rest
    cfg = {**net.pretrained_cfg, "state_dict": state, "num_classes": file_classes}
    cfg.pop("source", None)  # a config naming the hub as its source would make timm download instead
    load_pretrained(net, pretrained_cfg=cfg, num_classes=num_classes, filter_fn=checkpoint_filter(model_name))
    return _head_note(path, file_classes, num_classes, bool(classifiers))


def _head_note(source: str, file_classes: int, num_classes: int, has_head: bool) -> str:
    if not has_head:
        return f"loaded pretrained weights from {source}"
    if file_classes == num_classes:
        return f"loaded pretrained weights from {source}, head included ({num_classes} classes)"
    had = f"its {file_classes}-class head" if file_classes else "it has no head"
    return f"loaded pretrained weights from {source}; {had}: a new {num_classes}-class head is trained"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (a DNS failure or closed network is known in ~1 s). Behind a
    proxy or with a mirror (`HF_ENDPOINT`) a direct probe proves nothing: the hub client is left to try."""
    if any(os.environ.get(name) for name in ("HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_cache_only():
    """Make huggingface_hub read its local cache only (no request, no retries) for the duration."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def load_published_weights(net: torch.nn.Module, model_name: str, num_classes: int) -> str:
    """timm's published weights for `model_name` (a `name.tag` picks a tag), from the network or the local cache."""
    cfg = net.pretrained_cfg
    hint = "give a local weights file with --model.pretrained_path FILE"
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise UserError(f"timm publishes no pretrained weights for {model_name!r}; {hint}")
    online = hub_reachable()
    context = contextlib.nullcontext() if online else _hub_cache_only()
    try:
        with context:
            load_pretrained(
                net,
                pretrained_cfg=cfg,
                num_classes=num_classes,
                filter_fn=checkpoint_filter(model_name),
            )
    except Exception as err:  # network, cache and hub errors come in many types; all mean "no weights here"
        reason = "no network and not in the local cache" if not online else str(err).splitlines()[0]
        raise UserError(f"cannot get timm's pretrained weights for {model_name!r} ({reason}); {hint}") from None
    source = cfg.get("hf_hub_id") or cfg.get("url")
    return _head_note(f"timm ({source})", int(cfg.get("num_classes") or 0), num_classes, bool(classifier_names(net)))
