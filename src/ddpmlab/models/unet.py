"""The U-Net of Ho et al. 2020 (appendix B), a PixelCNN++-style backbone of Wide-ResNet blocks.

Per resolution: `num_res_blocks` residual blocks (GroupNorm, swish, 3x3 convs, the time embedding
added in between, dropout), self-attention at the resolutions in `attn_resolutions`, then a strided
3x3 conv down. The decoder mirrors it with one extra block per level fed by skip connections.
The CIFAR-10 setting (ch=128, ch_mult=1,2,2,2, 2 blocks, attention at 16) has 35.7M parameters.
Two options of Nichol & Dhariwal 2021 (iDDPM's CIFAR-10 network): multi-head attention (`num_heads`) and the
time embedding as a scale and shift of the second GroupNorm (`scale_shift_norm`).
Class conditioning (`num_classes`): a learned embedding of the class label added to the time embedding, as
improved-diffusion's and guided-diffusion's UNetModel (`label_emb`) and diffusers' UNet2DModel (`num_class_embeds`)
do, with one extra row, index num_classes, for "no class": the unconditional model that classifier-free guidance
needs (Ho & Salimans 2022, arXiv 2207.12598, section 3.2), trained by dropping labels (diffusion.cond_drop_prob).
Options for weights trained elsewhere to give the same outputs here (ddpmlab.hub): GroupNorm's `norm_eps`
(TensorFlow's group_norm, and so the authors' released weights, use 1e-6), TensorFlow's 'SAME' padding of the
strided conv (`downsample_padding=same`: one zero row and column, bottom and right only) and the layout of the
sinusoidal embedding (`flip_sin_to_cos`, `freq_shift`). The defaults are this project's own networks.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpmlab.errors import ConfigError

DOWNSAMPLE_PADDINGS = ("symmetric", "same")


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0) -> Tensor:
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017, section 3.5): (B,) -> (B, dim).

    Frequencies 10000^(-i / (dim/2 - freq_shift)), i < dim/2, then [sin, cos]; Ho et al. use freq_shift = 1 and
    sin first, diffusers' UNet2DModel defaults to freq_shift = 0 and cos first (`flip_sin_to_cos`).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    return F.pad(torch.cat(parts, dim=1), (0, dim % 2))


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's weights, as Ho et al. do for every layer that closes a residual branch."""
    for p in module.parameters():
        nn.init.zeros_(p)
    module.zero_init = True  # the U-Net's Xavier pass skips it
    return module


class ResBlock(nn.Module):
    """Wide-ResNet block: GN-swish-conv, + Dense(temb), GN-swish-dropout-conv, plus a 1x1 skip when channels change.

    With `attn`, self-attention follows the block (the U-Net's attention resolutions). With `scale_shift`,
    the time embedding gives (s, b) and the second norm becomes GN(h) (1 + s) + b instead of h + Dense(temb).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int, attn: bool = False,
                 num_heads: int = 1, scale_shift: bool = False, eps: float = 1e-5):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch, groups, num_heads, eps) if attn else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.temb_proj(F.silu(temb))[:, :, None, None]  # (B, 4ch) -> (B, C or 2C, 1, 1)
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.attn(self.skip(x) + h)


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions with `num_heads` heads (Ho et al.: 1), with a residual connection."""

    def __init__(self, ch: int, groups: int, num_heads: int = 1, eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch, eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        # The 1x1 convolutions as matrix products over the H*W tokens (B, HW, C): the same parameters, but a
        # GEMM instead of a convolution call (faster on CPU; free of copies when x is channels_last).
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, HW, 3C)
        q, k, v = qkv.reshape(b, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, HW, C)
        return x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv, padded by one on every side (`symmetric`) or, as
    TensorFlow's 'SAME' does for a stride-2 conv of an even size, by one at the bottom and right only (`same`)."""

    def __init__(self, ch: int, padding: str = "symmetric"):
        super().__init__()
        self.same = padding == "same"
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if self.same else 1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.same else x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps/x0/v network `model(x_t, t, y=None)`: (B, in_channels, S, S), (B,), (B,) -> (B, out_channels, S, S).

    y: class labels in [0, num_classes], num_classes meaning "no class"; None is "no class" for every image.
    An unconditional network (num_classes=None) takes no labels.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        out_channels: int,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        norm_groups: int = 32,
        num_heads: int = 1,
        scale_shift_norm: bool = False,
        norm_eps: float = 1e-5,
        downsample_padding: str = "symmetric",
        flip_sin_to_cos: bool = False,
        freq_shift: float = 1.0,
        num_classes: int | None = None,
    ):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        self._validate(image_size, ch, ch_mult, num_res_blocks, attn_resolutions, norm_groups, num_heads)
        if downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ConfigError(f"model.downsample_padding={downsample_padding!r} is unknown: choose one of "
                              f"{', '.join(DOWNSAMPLE_PADDINGS)}")
        if not (isinstance(norm_eps, (int, float)) and norm_eps > 0):
            raise ConfigError(f"model.norm_eps must be a positive number, got {norm_eps!r}: torch's default is 1e-5")
        if num_classes is not None and not (isinstance(num_classes, int) and not isinstance(num_classes, bool)
                                            and num_classes >= 1):
            raise ConfigError(f"model.num_classes must be a positive integer or null, got {num_classes!r}")
        temb_ch = 4 * ch
        block = functools.partial(ResBlock, temb_ch=temb_ch, dropout=dropout, groups=norm_groups,
                                  num_heads=num_heads, scale_shift=scale_shift_norm, eps=norm_eps)
        self.ch, self.flip_sin_to_cos, self.freq_shift = ch, flip_sin_to_cos, freq_shift
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        # (num_classes + 1) x 4ch: each class's vector, then "no class"; nn.Embedding's N(0, 1) init, as improved-
        # diffusion's label_emb and diffusers' class_embedding have
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes + 1, temb_ch) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs, cur, res = [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(cur, ch * mult, attn=res in attn_resolutions))
                cur = ch * mult
                skip_chs.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(cur, downsample_padding))
                skip_chs.append(cur)
                res //= 2

        self.mid = nn.ModuleList([block(cur, cur, attn=True), block(cur, cur)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(cur + skip_chs.pop(), ch * mult, attn=res in attn_resolutions))
                cur = ch * mult
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2

        self.norm_out = nn.GroupNorm(norm_groups, cur, norm_eps)
        self.conv_out = _zero(nn.Conv2d(cur, out_channels, 3, padding=1))
        # Ho et al. initialise every other layer with variance_scaling(1, fan_avg, uniform) = Xavier uniform.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not getattr(m, "zero_init", False):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _validate(image_size, ch, ch_mult, num_res_blocks, attn_resolutions, norm_groups, num_heads) -> None:
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ConfigError(
                f"model: image size {image_size} cannot be halved {len(ch_mult) - 1} times (ch_mult={list(ch_mult)}): "
                f"use an image size divisible by {factor} or a shorter model.ch_mult"
            )
        bad = [ch * m for m in ch_mult if (ch * m) % norm_groups]
        if bad:
            raise ConfigError(
                f"model: channel counts {bad} are not divisible by norm_groups={norm_groups}: "
                f"make model.ch a multiple of {norm_groups}"
            )
        bad = [ch * m for m in ch_mult if (ch * m) % num_heads]
        if num_heads < 1 or bad:
            raise ConfigError(
                f"model.num_heads={num_heads} does not divide the channel counts {bad or [ch]}: "
                f"use a num_heads that divides model.ch"
            )
        if num_res_blocks < 1:
            raise ConfigError(f"model.num_res_blocks must be at least 1, got {num_res_blocks}")
        sizes = {image_size // 2**i for i in range(len(ch_mult))}
        if set(attn_resolutions) - sizes:
            raise ConfigError(
                f"model.attn_resolutions={list(attn_resolutions)} names sizes the U-Net never has: "
                f"choose from {sorted(sizes, reverse=True)}"
            )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        temb = self.temb(timestep_embedding(t, self.ch, self.flip_sin_to_cos, self.freq_shift))  # (B,) -> (B, 4ch)
        if self.label_emb is not None:
            y = torch.full_like(t, self.num_classes) if y is None else y  # None: "no class"
            temb = temb + self.label_emb(y)  # (B,) -> (B, 4ch)
        elif y is not None:
            raise ValueError("class labels given to an unconditional U-Net (model.num_classes=null)")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, temb)
            skips.append(h)
        for block in self.mid:
            h = block(h, temb)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C, S, S) -> (B, C + C_skip, S, S)
            h = block(h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))
