"""An export folder (`python -m askexpert export`) as the server and the edge client read it.

Torch-free on purpose: the expert server's inference workers import this module, and they need only NumPy and
ONNX Runtime. Every model file is checked against the SHA-256 the manifest records before it is loaded, so a
half-copied or swapped folder is refused rather than served.

The model version is the first 12 hex digits of the manifest's own SHA-256: a new export (new weights, new
operating point) is a new version, and every reply of the server carries it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from askexpert.errors import UserError

SUPPORTED_FORMAT = 1


@dataclass(frozen=True)
class ExportBundle:
    folder: str
    manifest: dict
    version: str

    @property
    def stored_size(self) -> int:
        return int(self.manifest["models"]["generalist"]["input"]["shape"][-1])

    @property
    def expert_names(self) -> list[str]:
        return [name for name in self.manifest["models"] if name != "generalist"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def operating_point(self) -> dict:
        return dict(self.manifest["operating_point"])

    def contract(self) -> dict:
        """What a client may send and expect back; a reload must keep it (the HTTP side validates against it)."""
        models = self.manifest["models"]
        return {
            "stored_size": self.stored_size,
            "experts": {name: int(models[name]["output"]["shape"][-1]) for name in self.expert_names},
            "class_names": self.class_names,
            "partition": [list(map(int, e)) for e in self.manifest["partition"]["experts"]],
        }

    def model_entry(self, name: str, precision: str = "fp32") -> dict:
        """The manifest's entry (file, sha256, ...) for one model at `precision` ("fp32" or "int8")."""
        check_precision(precision)
        entry = self.manifest["models"][name]
        if precision == "int8":
            if "int8" not in entry:
                raise UserError(f"{self.folder} has no int8 models; export the run with --int8 true")
            entry = entry["int8"]
        return entry

    def session(self, name: str, threads: int = 0, device: str = "cpu", precision: str = "fp32"):
        """An ONNX Runtime session for one model, after checking the file's hash against the manifest.

        `device`: "cpu", "cuda" (ONNX Runtime's CUDA provider: needs the onnxruntime-gpu package) or "auto"
        (CUDA when this ONNX Runtime has it). `precision`: "fp32", or "int8" for an export made with --int8."""
        import onnxruntime as ort

        entry = self.model_entry(name, precision)
        path = os.path.join(self.folder, entry["file"])
        if not os.path.isfile(path):
            raise UserError(f"{self.folder} lacks {os.path.basename(path)}; export the run again")
        with open(path, "rb") as f:
            data = f.read()  # hashed and loaded from the same bytes: a folder swapped meanwhile cannot slip in
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise UserError(f"{path} does not match the SHA-256 in its manifest (damaged or replaced); export again")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        wanted = providers(device)
        session = ort.InferenceSession(data, options, providers=wanted)
        if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise UserError(f"--device cuda: ONNX Runtime could not put {name} on the GPU")
        return session


PRECISIONS = ("fp32", "int8")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be fp32 or int8, got {precision!r}")


def providers(device: str) -> list[str]:
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not cuda:
        raise UserError("--device cuda: this ONNX Runtime has no CUDA provider (install onnxruntime-gpu)")
    if device not in ("cpu", "cuda", "auto"):
        raise UserError(f"--device must be cpu, cuda or auto, got {device!r}")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda and device != "cpu" else ["CPUExecutionProvider"]


def manifest_path(folder: str) -> str:
    return os.path.join(folder, "manifest.json")


def manifest_stamp(folder: str) -> tuple | None:
    """(inode, size, mtime) of the manifest, or None while there is none: a cheap way to notice a new export."""
    try:
        st = os.stat(manifest_path(folder))
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def load_bundle(folder: str) -> ExportBundle:
    """Read and check an export folder's manifest (the model files are checked when each is loaded)."""
    path = manifest_path(folder)
    if not os.path.isdir(folder):
        raise UserError(f"export folder not found: {folder} (write one with `python -m askexpert export`)")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no manifest.json: it is not an export (or one still being written)")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        manifest = json.loads(raw.decode("utf-8"))
        version = manifest["format_version"]
        models = manifest["models"]
        if not isinstance(models, dict) or "generalist" not in models:
            raise KeyError("models")
        for entry in models.values():
            int(entry["input"]["shape"][-1]), int(entry["output"]["shape"][-1]), str(entry["file"])
            str(entry["sha256"])
            if "int8" in entry:
                str(entry["int8"]["file"]), str(entry["int8"]["sha256"])
        op = manifest["operating_point"]
        _number(op["threshold"]), _number(op["temperature_value"]), str(op["gate"]), int(op["top_k"])
        str(op["fusion"])
        if op.get("second_expert") is not None:  # absent in one-expert exports (and in those made before it)
            _number(op["second_expert"]["margin"]), str(op["second_expert"]["fusion"])
        [list(map(int, e)) for e in manifest["partition"]["experts"]]
        list(manifest["class_names"])
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError):
        raise UserError(f"{path} is damaged or not an askexpert manifest; export the run again") from None
    if version != SUPPORTED_FORMAT:
        raise UserError(f"{path} has format_version {version!r}; this askexpert reads {SUPPORTED_FORMAT}")
    experts = [name for name in models if name != "generalist"]
    if not experts:
        raise UserError(f"{path} lists no expert; nothing to serve or offload to")
    if len(manifest["partition"]["experts"]) != len(experts):
        raise UserError(
            f"{path} lists {len(experts)} expert models for {len(manifest['partition']['experts'])} subsets"
        )
    return ExportBundle(os.path.abspath(folder), manifest, hashlib.sha256(raw).hexdigest()[:12])


def _number(value) -> float:
    """A manifest number: JSON's int or float, never a text that merely parses as one (it would reach the router
    as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {value!r}")
    return float(value)
