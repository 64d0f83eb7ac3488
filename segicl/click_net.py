"""A learned interactive segmenter: clicks, boxes and scribbles as inputs of a small U-Net, the
in-context prior as one more input (issue 22, item 1).

Input channels at the working grid (the query at most ``size`` px on its longer side, aspect kept,
padded to a multiple of 16): the image (3, in [-1, 1]), positive marks, negative marks (clicks as
discs of ``click_radius`` px, scribbles as polylines of that width), boxes (1 inside), and the
context prior: ``2 * (p - 0.5)`` of the in-context probability (the label propagation over the
finished images, or the learned SegICL path), with a flag channel that says whether there is one.
Output: one logit per pixel. The network is MONAI's 2-D ``UNet`` (instance norm, residual units).

Why a separate query-side network and not extra ControlNet hint channels (the issue's first
suggestion): a click must answer in 0.3 s on two CPU cores, and one call of the diffusion decoder
costs 1-4 s there (docs/interactive.md); the context is read once per context version into the
prior, the cached "prefix", and a click re-runs only this network (about 10 ms at 128 px).
Training: training/click_task.py (``segicl train click``), simulated users over real and pseudo tasks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

FORMAT = "segicl-clicknet/1"
SHIPPED = Path(__file__).resolve().parent / "checkpoints" / "click"
IN_CHANNELS = 8  # image (3), positive, negative, box, prior, has-prior


@dataclass
class ClickNetConfig:
    size: int = 128  # longer side of the working grid (training crops are size x size)
    channels: tuple[int, ...] = (16, 32, 64, 128, 128)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    click_radius: int = 3  # px at the working grid

    def validate(self) -> ClickNetConfig:
        if self.size < 16 or self.click_radius < 0 or len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"click net: size >= 16, click_radius >= 0 and len(strides) = len(channels) - 1, got {self}")
        return self

    @property
    def multiple(self) -> int:
        return int(np.prod(self.strides))


def shipped_click_checkpoint(required: bool = True) -> Path | None:
    """The interactive network that ships inside the package (None, or an error, when absent)."""
    if (SHIPPED / "manifest.json").is_file():
        return SHIPPED
    if required:
        raise FileNotFoundError(f"{SHIPPED}: no interactive network ships with this package (train one: segicl train click)")
    return None


def rasterise(interactions, shape: tuple[int, int], scale: tuple[float, float], radius: int) -> np.ndarray:
    """(3, h, w) float32 maps of an :class:`segicl.interactive.Interactions` on an ``(h, w)`` grid
    (image pixels times ``scale`` (sy, sx)): positive marks, negative marks, boxes."""
    from segicl.interactive import Interactions

    marks = Interactions(interactions.pos_points, interactions.neg_points, [], interactions.pos_scribbles,
                         interactions.neg_scribbles).seeds(shape, scale, radius, 0.0)
    h, w = shape
    box = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(box)
    for y0, x0, y1, x1 in interactions.boxes:
        draw.rectangle([int(x0 * scale[1]), int(y0 * scale[0]), int(x1 * scale[1]), int(y1 * scale[0])], fill=1)
    return np.stack([marks == 1, marks == 2, np.asarray(box) > 0]).astype(np.float32)


def encode(image: torch.Tensor, marks: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """(B, 8, H, W) network input from the image (B, 3, H, W) in [-1, 1], the marks (B, 3, H, W) of
    :func:`rasterise` and the prior (B, 1, H, W) in [0, 1] (None, or NaN per item: no prior)."""
    b, _, h, w = image.shape
    if prior is None:
        prior = torch.full((b, 1, h, w), float("nan"))
    has = ~torch.isnan(prior.flatten(1)).any(1)
    p = torch.where(has[:, None, None, None], 2 * (torch.nan_to_num(prior, 0.5) - 0.5), torch.zeros_like(prior))
    return torch.cat([image, marks, p, has[:, None, None, None].float().expand(b, 1, h, w)], 1)


class ClickNet(nn.Module):
    def __init__(self, cfg: ClickNetConfig | None = None):
        super().__init__()
        from monai.networks.nets import UNet

        self.cfg = (cfg or ClickNetConfig()).validate()
        self.net = UNet(spatial_dims=2, in_channels=IN_CHANNELS, out_channels=1, channels=tuple(self.cfg.channels),
                        strides=tuple(self.cfg.strides), num_res_units=self.cfg.num_res_units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 8, H, W) from :func:`encode`, H and W multiples of ``cfg.multiple`` -> (B, 1, H, W) logits."""
        return self.net(x)

    def working_shape(self, height: int, width: int) -> tuple[int, int]:
        s = self.cfg.size / max(height, width)
        return max(1, round(height * s)), max(1, round(width * s))

    @torch.no_grad()
    def predict(self, image: Image.Image, interactions, prior: np.ndarray | None = None) -> np.ndarray:
        """The probability (h, w) at the working grid of ``image`` (:meth:`working_shape`) given the
        interactions (image pixel coordinates) and the prior (any (H', W') in [0, 1], resized here)."""
        from segicl.data.transforms import resize_prob

        h, w = self.working_shape(image.height, image.width)
        x = torch.from_numpy(np.asarray(image.convert("RGB").resize((w, h), Image.BICUBIC), np.float32))
        x = x.permute(2, 0, 1)[None] / 127.5 - 1
        marks = torch.from_numpy(rasterise(interactions, (h, w), (h / image.height, w / image.width),
                                           self.cfg.click_radius))[None]
        p = None if prior is None else torch.from_numpy(resize_prob(np.asarray(prior, np.float32), (h, w)))[None, None]
        inp = encode(x, marks, p)
        m = self.cfg.multiple
        ph, pw = -h % m, -w % m
        inp = F.pad(inp, (0, pw, 0, ph))
        logits = self(inp)[0, 0, :h, :w]
        return torch.sigmoid(logits).numpy()

    def save_pretrained(self, path: str | Path, half: bool = False) -> Path:
        """Atomic safetensors folder; ``half`` stores float16 weights (the shipped copy: half the bytes in
        git; loading casts them back to float32)."""
        from segicl.io import save_safetensors_dir

        state = {k: v.half() if half and v.is_floating_point() else v for k, v in self.state_dict().items()}
        return save_safetensors_dir(path, FORMAT, asdict(self.cfg), state)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ClickNet:
        from segicl.io import load_safetensors_dir

        cfg, state = load_safetensors_dir(path, FORMAT)
        model = cls(ClickNetConfig(**cfg))
        model.load_state_dict(state)
        return model.eval()

