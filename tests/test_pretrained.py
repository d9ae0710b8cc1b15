"""Pretrained weights (askexpert/models/pretrained.py): files made in the test stand in for ImageNet weights.

Every file is loaded through the module the CLI uses, and every backbone weight must equal the file's, the
resampled position embeddings excepted; a file of another architecture, or no weights at all, is one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from askexpert.errors import UserError
from askexpert.models import pretrained
from askexpert.modules import ExpertModule, GeneralistModule

TIMM_VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def imagenet_like() -> dict[str, torch.Tensor]:
    """A timm ViT's state dict with a 1000-class head at 224 px (random weights, like a downloaded file's layout)."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in timm.create_model(TIMM_VIT, num_classes=1000).state_dict().items()}


def _save(state: dict[str, torch.Tensor], path: Path, form: str) -> Path:
    if form == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    if form == "timm_checkpoint":  # timm's train script: {"state_dict": ..., "epoch": ..., "arch": ...}
        torch.save({"state_dict": state, "epoch": 3, "arch": TIMM_VIT}, path.with_suffix(".pth.tar"))
        return path.with_suffix(".pth.tar")
    if form == "lightning":  # a LightningModule that keeps its network under `net.`
        torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}, "epoch": 1}, path.with_suffix(".ckpt"))
        return path.with_suffix(".ckpt")
    torch.save(state, path.with_suffix(".pth"))
    return path.with_suffix(".pth")


def _backbone_equal(model, state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the network's weights that differ from the file's (head and position embeddings left out)."""
    mine = model.net.state_dict()
    return [k for k, v in state.items() if not k.startswith(("head.", "pos_embed")) and not torch.equal(mine[k], v)]


def _check_trains(model, image_size: int) -> None:
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # stored size; the model resizes
    logits = model(images)
    assert logits.shape == (2, 100)
    loss = F.cross_entropy(logits, torch.tensor([3, 7]))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.net.parameters() if p.requires_grad)


@pytest.mark.parametrize(("form", "image_size"), [("safetensors", 64), ("state_dict", 32), ("lightning", 64)])
def test_imagenet_head_file_loads_into_100_class_model(tmp_path, imagenet_like, form, image_size, capsys) -> None:
    path = _save(imagenet_like, tmp_path / "vit_tiny", form)
    model = GeneralistModule(model_name=TIMM_VIT, num_classes=100, image_size=image_size, pretrained_path=str(path))
    before = model.net.head.weight.clone()
    model.prepare_initial_weights()
    assert "its 1000-class head" in capsys.readouterr().err
    assert _backbone_equal(model, imagenet_like) == []
    grid = image_size // 16
    assert model.net.pos_embed.shape == (1, 1 + grid * grid, 192)  # class token + the new grid, resampled
    assert model.net.head.weight.shape == (100, 192) and torch.equal(model.net.head.weight, before)  # new head kept
    # normalisation comes from the weights' pretrained config (augreg ViTs: 0.5 / 0.5), not CIFAR-100's
    assert model.hparams.mean == (0.5, 0.5, 0.5) and model.hparams.std == (0.5, 0.5, 0.5)
    _check_trains(model, image_size)


def test_headless_file_loads_with_a_new_head(tmp_path, imagenet_like, capsys) -> None:
    headless = {k: v for k, v in imagenet_like.items() if not k.startswith("head.")}
    path = _save(headless, tmp_path / "features", "timm_checkpoint")
    model = GeneralistModule(model_name=TIMM_VIT, num_classes=100, image_size=64, pretrained_path=str(path))
    model.prepare_initial_weights()
    assert "it has no head" in capsys.readouterr().err
    assert _backbone_equal(model, headless) == []
    assert model.net.pos_embed.shape == (1, 17, 192)
    _check_trains(model, 64)


def test_file_with_the_right_head_loads_the_head_too(tmp_path) -> None:
    torch.manual_seed(1)
    state = timm.create_model("vit_micro_patch8_32", num_classes=100).state_dict()
    path = _save(state, tmp_path / "micro", "safetensors")
    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=100, pretrained_path=str(path))
    model.prepare_initial_weights()
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in state.items())


def test_file_of_another_architecture_is_refused(tmp_path) -> None:
    path = _save(timm.create_model("resnet18", num_classes=1000).state_dict(), tmp_path / "resnet", "safetensors")
    model = GeneralistModule(model_name=TIMM_VIT, num_classes=100, image_size=64, pretrained_path=str(path))
    with pytest.raises(UserError) as err:
        model.prepare_initial_weights()
    message = str(err.value)
    assert "do not fit vit_tiny_patch16_224" in message and "\n" not in message
    assert "missing" in message and "unexpected 122" in message and "layer1.0" in message


def test_file_of_another_width_names_the_mismatch(tmp_path) -> None:
    path = _save(timm.create_model("vit_small_patch16_224", num_classes=10).state_dict(), tmp_path / "small", "pth")
    model = GeneralistModule(model_name=TIMM_VIT, num_classes=100, pretrained_path=str(path), image_size=32)
    with pytest.raises(
        UserError, match=r"do not fit vit_tiny_patch16_224: other shapes .*cls_token \(1, 1, 384\) vs \(1, 1, 192\)"
    ):
        model.prepare_initial_weights()


def test_pretrained_without_network_or_file_is_one_line(monkeypatch) -> None:
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: False)
    model = GeneralistModule(model_name=TIMM_VIT, num_classes=100, image_size=32, pretrained=True)
    with pytest.raises(UserError) as err:
        model.prepare_initial_weights()
    message = str(err.value)
    assert "no network and not in the local cache" in message and "--model.pretrained_path FILE" in message


def test_model_without_published_weights_says_how_to_supply_a_file() -> None:
    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=100, pretrained=True)
    with pytest.raises(UserError, match="timm publishes no pretrained weights for 'vit_micro_patch8_32'.*FILE"):
        model.prepare_initial_weights()


def test_files_that_are_not_weights_are_refused(tmp_path) -> None:
    (tmp_path / "notes.safetensors").write_text("not weights")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    for path, fragment in (
        (tmp_path / "notes.safetensors", "cannot read pretrained weights"),
        (tmp_path / "meta.pth", "holds no state dict of tensors"),
        (tmp_path / "absent.pth", "pretrained weights file not found"),
    ):
        with pytest.raises(UserError, match=fragment):
            pretrained.read_state_dict(str(path))


def test_weights_are_not_loaded_when_the_module_is_rebuilt(tmp_path) -> None:
    """A trained model reloads from its checkpoint without its pretrained file (nothing read in __init__)."""
    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10, pretrained_path=str(tmp_path / "gone"))
    assert model.net is not None  # building never touched the (missing) file


def test_pretrained_expert_gets_a_new_dustbin_head(tmp_path, imagenet_like) -> None:
    path = _save(imagenet_like, tmp_path / "vit", "safetensors")
    expert = ExpertModule(
        subset=[1, 2],
        model_name=TIMM_VIT,
        num_classes=100,
        image_size=32,
        init="pretrained",
        pretrained_path=str(path),
        other_output=True,
    )
    expert.prepare_initial_weights()
    assert expert.net.head.weight.shape == (101, 192)
    assert _backbone_equal(expert, imagenet_like) == []


def test_fine_tuning_groups_give_head_and_layers_their_own_rates() -> None:
    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10, lr=1e-3, head_lr=1e-2, layer_decay=0.5)
    groups = model.fine_tuning_groups()
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.net.parameters())  # every parameter exactly once
    head = {id(p) for p in model.net.get_classifier().parameters()}
    head_groups = [g for g in groups if {id(p) for p in g["params"]} <= head]
    assert head_groups and all(g["lr"] == 1e-2 for g in head_groups)
    body_lrs = sorted({g["lr"] for g in groups if not any(g is h for h in head_groups)})
    # micro ViT: patch embedding, 2 blocks, final norm -> layer scales 0.5^3 .. 0.5^0 of lr
    assert body_lrs[0] == pytest.approx(1e-3 * 0.5**3) and body_lrs[-1] == pytest.approx(1e-3)
    assert any(g["weight_decay"] == 0 for g in groups) and any(g["weight_decay"] > 0 for g in groups)


def test_bad_fine_tuning_rates_are_refused() -> None:
    with pytest.raises(UserError, match="head_lr must be positive"):
        GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10, head_lr=0.0)
    with pytest.raises(UserError, match="layer_decay in"):
        GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10, layer_decay=1.5)


def test_an_expert_with_init_pretrained_asks_for_weights_even_when_pretrained_is_false() -> None:
    """The CLI passes every parent argument (`pretrained: false` included): `init: pretrained` must still load."""
    expert = ExpertModule(
        subset=[1], init="pretrained", pretrained=False, model_name="vit_micro_patch8_32", num_classes=100
    )
    with pytest.raises(UserError, match="timm publishes no pretrained weights for 'vit_micro_patch8_32'"):
        expert.prepare_initial_weights()


def test_a_file_without_batchnorm_counters_loads(tmp_path) -> None:
    """torchvision's ResNet weights have no `num_batches_tracked`; torch fills them in, so they are not missing."""
    torch.manual_seed(2)
    state = {k: v for k, v in timm.create_model("resnet18").state_dict().items() if "num_batches_tracked" not in k}
    path = _save(state, tmp_path / "resnet", "pth")
    model = GeneralistModule(model_name="resnet18", num_classes=100, pretrained_path=str(path))
    model.prepare_initial_weights()
    assert _backbone_equal(model, {k: v for k, v in state.items() if not k.startswith("fc.")}) == []


def test_an_askexpert_checkpoint_brings_its_normalisation(tmp_path) -> None:
    source = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10)
    state = {f"net.{k}": v for k, v in source.net.state_dict().items()}
    hparams = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "run.ckpt")
    model = GeneralistModule(
        model_name="vit_micro_patch8_32", num_classes=10, pretrained_path=str(tmp_path / "run.ckpt")
    )
    model.prepare_initial_weights()
    assert model.hparams.mean == (0.1, 0.2, 0.3) and torch.allclose(model.std.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    explicit = GeneralistModule(
        model_name="vit_micro_patch8_32", num_classes=10, pretrained_path=str(tmp_path / "run.ckpt"), mean=(0.5,) * 3
    )
    explicit.prepare_initial_weights()
    assert explicit.hparams.mean == (0.5, 0.5, 0.5)  # what the user set wins


def test_cli_loads_pretrained_weights_for_a_first_start_with_ckpt_path_last_and_for_test(tmp_path, capsys) -> None:
    """A requeued job passes `--ckpt_path last` from its first start: nothing to resume, so the weights load;
    `test` without a checkpoint evaluates the pretrained model itself."""
    from conftest import TINY_ARGS
    from helpers.cli import run_main

    torch.manual_seed(3)
    path = _save(timm.create_model("vit_micro_patch8_32", num_classes=100).state_dict(), tmp_path / "w", "safetensors")
    common = [*TINY_ARGS, "--model.pretrained_path", str(path), "--trainer.limit_train_batches", "1"]
    code, _, err = run_main(
        ["fit", *common, "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path / "r")], capsys
    )
    assert code == 0 and "loaded pretrained weights from" in err, err
    code, _, err = run_main(["test", *common, "--trainer.default_root_dir", str(tmp_path / "t")], capsys)
    assert code == 0 and "loaded pretrained weights from" in err, err
