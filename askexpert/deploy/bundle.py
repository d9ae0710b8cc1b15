"""An export folder (`python -m askexpert export`) as the server and the edge client read it.

Torch-free on purpose: the expert server's inference workers import this module, and they need only NumPy and
ONNX Runtime. Every model file is checked against the SHA-256 the manifest records before it is loaded, so a
half-copied or swapped folder is refused rather than served.

The model version is the first 12 hex digits of the manifest's own SHA-256: a new export (new weights, new
operating point) is a new version, and every reply of the server carries it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from askexpert.deploy.manifest_checks import BadField, check_manifest
from askexpert.errors import UserError
from askexpert.files.reading import DamagedFile, parse_json, read_bytes

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
        try:
            session = ort.InferenceSession(data, options, providers=wanted)
        except Exception as err:  # noqa: BLE001 (ONNX Runtime's own exception types are not public API)
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise UserError(
                f"ONNX Runtime cannot load {path}: not an ONNX model, or not one it runs ({reason}); export again"
            ) from None
        check_signature(session, self.manifest["models"][name], path)
        if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise UserError(f"--device cuda: ONNX Runtime could not put {name} on the GPU")
        return session


PRECISIONS = ("fp32", "int8")


def check_signature(session, entry: dict, path: str) -> None:
    """Refuse a loadable model that is not the one the manifest describes (another network's file, its hash
    recorded by hand): one uint8 image input of the manifest's name and size, one output as wide as the manifest
    says; else every request would fail inside ONNX Runtime instead. A named (dynamic) dimension takes any size."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    wanted = entry["input"]
    found = inputs[0] if len(inputs) == 1 else None
    if found is None or found.name != wanted["name"] or found.type != "tensor(uint8)" or not _fits(found, wanted):
        shown = ", ".join(f"{i.name} {i.shape} {i.type}" for i in inputs) or "nothing"
        raise UserError(
            f"{path} takes {shown}, not the manifest's {wanted['name']} {wanted['shape']} of uint8; export again"
        )
    if len(outputs) != 1 or not _fits(outputs[0], entry["output"]):
        shown = ", ".join(f"{o.name} {o.shape}" for o in outputs) or "nothing"
        raise UserError(f"{path} answers {shown}, not the manifest's logits {entry['output']['shape']}; export again")


def _fits(node, described: dict) -> bool:
    """Whether an ONNX input or output has the manifest's shape (the batch dimension and named ones left free)."""
    shape, wanted = list(node.shape or []), described["shape"]
    if len(shape) != len(wanted):
        return False
    return all(not isinstance(a, int) or a == b for a, b in zip(shape[1:], wanted[1:], strict=True))


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
    raw = read_bytes(path)  # hashed below: the version is of these bytes
    try:
        manifest = parse_json(raw, path)
    except DamagedFile as err:
        reason = err.reason
        raise UserError(f"{path} is damaged or not an askexpert manifest ({reason}); export the run again") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version is None:
        raise UserError(f"{path} is damaged or not an askexpert manifest (no format_version); export the run again")
    if isinstance(version, bool) or version != SUPPORTED_FORMAT:
        raise UserError(f"{path} has format_version {version!r}; this askexpert reads {SUPPORTED_FORMAT}")
    try:
        check_manifest(manifest)
    except BadField as err:
        raise UserError(f"{path} is damaged: {err}; export the run again") from None
    return ExportBundle(os.path.abspath(folder), manifest, hashlib.sha256(raw).hexdigest()[:12])
