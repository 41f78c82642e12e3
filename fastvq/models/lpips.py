"""VGG16-LPIPS perceptual distance (Zhang et al. 2018) in plain torch, weights from a file.

No weights ship and nothing is downloaded. The file is a state dict (.safetensors, or a torch
.pt/.pth) with torchvision's VGG16 trunk keys ``features.{i}.weight|bias`` (i in 0, 2, 5, 7, 10,
12, 14, 17, 19, 21, 24, 26, 28) and the LPIPS v0.1 heads ``lin{k}.model.1.weight`` (k in 0..4),
i.e. torchvision's ``vgg16().state_dict()`` features merged with the ``vgg.pth`` of the lpips
package.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VGG16_CHANNELS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's layout
TAP_CHANNELS = (64, 128, 256, 512, 512)


class LinearHead(nn.Module):
    """LPIPS 1x1 head without bias; ``model.1`` matches the lpips package's key names."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """forward(x, y): two (B, 3, H, W) images in [-1, 1] -> distance (B,) float32. Frozen."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for spec in VGG16_CHANNELS:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, spec, 3, padding=1), nn.ReLU()]
                c_in = spec
        self.features = nn.Sequential(*layers)
        for k, channels in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{k}", LinearHead(channels))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """Load the weights described in the module docstring; a clear ValueError otherwise."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights {path}: no such file")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any reader error means the file is unusable
            raise ValueError(f"LPIPS weights {path}: cannot read weights: {err}") from err
        model = cls()
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(
                f"LPIPS weights {path}: missing {len(missing)} VGG16-LPIPS tensors, e.g. "
                f"{missing[:3]}; expected keys features.N.weight/bias and linK.model.1.weight"
            )
        for key, value in expected.items():
            if state[key].shape != value.shape:
                raise ValueError(
                    f"LPIPS weights {path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}"
                )
        model.load_state_dict({key: state[key] for key in expected})
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).float().sub(self.shift).div(self.scale)
        total = 0.0
        tap = 0
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            h = layer(h)
            if i == TAPS[tap]:
                feats = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fx, fy = feats.chunk(2)
                total = total + getattr(self, f"lin{tap}")((fx - fy).pow(2)).mean((1, 2, 3))
                tap += 1
        return total
