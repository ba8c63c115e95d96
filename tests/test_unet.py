import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpmlab.errors import ConfigError
from ddpmlab.models import UNet
from ddpmlab.models.unet import AttnBlock, ResBlock
from ddpmlab.training import build_network
from tests.conftest import compose_config


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_cifar10_unet_has_35_7M_parameters():
    model, _ = build_network(compose_config("experiment=ddpm_cifar10"))
    # Ho et al. 2020, appendix B: "35.7 million parameters" for the CIFAR-10 model.
    assert round(n_params(model) / 1e6, 1) == 35.7
    assert n_params(model) == 35_746_307


def test_default_unet_maps_images_to_images_and_depends_on_t():
    model = build_network(compose_config())[0].eval()
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


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_block_is_multi_head_softmax_attention(heads):
    """Each head attends with its own C/heads channels of q, k, v (Vaswani et al. 2017, section 3.2.2)."""
    torch.manual_seed(0)
    block = AttnBlock(32, groups=32, num_heads=heads)
    nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 32, 4, 4)
    h = block.norm(x).flatten(2)  # (B, C, HW)
    w, b = block.qkv.weight[:, :, 0, 0], block.qkv.bias
    q, k, v = (torch.einsum("oc,bcn->bon", w, h) + b[None, :, None]).chunk(3, dim=1)  # 3 x (B, C, HW)
    d = 32 // heads
    outs = []
    for i in range(heads):
        qi, ki, vi = (m[:, i * d:(i + 1) * d] for m in (q, k, v))
        weights = torch.softmax(torch.einsum("bci,bcj->bij", qi, ki) / d**0.5, dim=-1)  # (B, HW, HW)
        outs.append(torch.einsum("bij,bcj->bci", weights, vi))
    expected = x + block.proj_out(torch.cat(outs, 1).reshape(2, 32, 4, 4))
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_scale_shift_norm_modulates_the_second_norm_with_the_time_embedding():
    """iDDPM's block: GN(h) (1 + s) + b with (s, b) = Dense(swish(temb)), in place of GN(h + Dense(swish(temb)))."""
    torch.manual_seed(0)
    block = ResBlock(32, 32, temb_ch=16, dropout=0.0, groups=8, scale_shift=True).eval()
    nn.init.normal_(block.conv2.weight, std=0.1)
    x, temb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    scale, shift = block.temb_proj(F.silu(temb)).chunk(2, dim=1)
    h = block.norm2(block.conv1(F.silu(block.norm1(x)))) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    assert torch.allclose(block(x, temb), x + block.conv2(F.silu(h)), atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(image_size=30, ch_mult=(1, 2, 2)), "cannot be halved"),
    (dict(image_size=28, ch=24), "not divisible by norm_groups"),
    (dict(image_size=28, attn_resolutions=(16,)), "names sizes the U-Net never has"),
    (dict(image_size=28, num_heads=3), "num_heads=3 does not divide"),
])
def test_bad_unet_sizes_are_refused_with_the_fix(kwargs, message):
    base = dict(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ConfigError, match=message):
        UNet(**{**base, **kwargs})


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_as_matrix_products_equals_the_1x1_convolutions(heads):
    """AttnBlock runs its 1x1 convolutions as GEMMs over the tokens: the same function of the same parameters."""
    block = AttnBlock(64, 32, heads)
    nn.init.normal_(block.proj_out.weight, std=0.1)  # zero-initialised: give the output projection weights
    x = torch.randn(2, 64, 8, 8)
    b, c, h, w = x.shape
    qkv = block.qkv(block.norm(x)).reshape(b, 3, heads, c // heads, h * w).transpose(-1, -2)
    out = F.scaled_dot_product_attention(*qkv.unbind(1)).transpose(-1, -2).reshape(b, c, h, w)
    expected = x + block.proj_out(out)
    assert torch.allclose(block(x), expected, atol=1e-5)
    assert torch.allclose(block(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
