import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from ddpmlab.errors import ConfigError
from ddpmlab.models import UNet
from ddpmlab.models.unet import AttnBlock
from tests.conftest import compose_config


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_cifar10_unet_has_35_7M_parameters():
    model = instantiate(compose_config("experiment=ddpm_cifar10").model)
    # Ho et al. 2020, appendix B: "35.7 million parameters" for the CIFAR-10 model.
    assert round(n_params(model) / 1e6, 1) == 35.7
    assert n_params(model) == 35_746_307


def test_default_unet_maps_images_to_images_and_depends_on_t():
    model = instantiate(compose_config().model).eval()
    for layer in model.modules():  # zero-initialised as in Ho et al.: give them weights so t can reach the output
        if getattr(layer, "zero_init", False):
            nn.init.normal_(layer.weight, std=0.1)
    x = torch.randn(2, 1, 28, 28)
    out = model(x, torch.tensor([3, 3]))
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, torch.tensor([900, 900])), atol=1e-4)


def test_unet_output_starts_at_zero_like_the_paper():
    model = UNet(image_size=16, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(8,))
    assert torch.count_nonzero(model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))) == 0


def test_attention_block_is_single_head_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(32, groups=32)
    nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 32, 4, 4)
    h = block.norm(x).flatten(2)  # (B, C, HW)
    w, b = block.qkv.weight[:, :, 0, 0], block.qkv.bias
    q, k, v = (torch.einsum("oc,bcn->bon", w, h) + b[None, :, None]).chunk(3, dim=1)  # 3 x (B, C, HW)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 32**0.5, dim=-1)  # (B, HW, HW)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(2, 32, 4, 4)
    expected = x + block.proj_out(attended)
    assert torch.allclose(block(x), expected, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(image_size=30, ch_mult=(1, 2, 2)), "cannot be halved"),
    (dict(image_size=28, ch=24), "not divisible by norm_groups"),
    (dict(image_size=28, attn_resolutions=(16,)), "names sizes the U-Net never has"),
])
def test_bad_unet_sizes_are_refused_with_the_fix(kwargs, message):
    base = dict(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ConfigError, match=message):
        UNet(**{**base, **kwargs})
