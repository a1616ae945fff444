"""The official AnomalyCLIP vision forward in PyTorch, as the speed reference for forward.py.

Run it with a Python that has torch (never needed by the package), e.g.
  python -m venv --system-site-packages /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch
  /tmp/torchvenv/bin/python benchmarks/forward_torch.py --batch-sizes 1

What it runs (AnomalyCLIP spec sections 2.1-2.5, random weights of the same shapes): OpenAI's CLIP
ViT in the sequence-first layout, `nn.MultiheadAttention` blocks below `--dpam-start`, and from
there blocks whose attention is the reference's custom module (one packed qkv Linear, both
softmax(q k^T) v and softmax(v v^T) v with explicit matmuls, one shared output projection); the
V-V stream skips ln_2 and the MLP. Outputs: `ln_post(x_vv) @ proj` at each tap and the vanilla
CLS @ proj. Under `torch.no_grad()` in eval mode, as the reference's encoder runs. One JSON line
per batch size, the fields of forward.py's lines where they apply.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch
from torch import nn

# ViT-L/14@336px: width, layers, heads, patch, stored grid, output dim.
ARCHITECTURES = {"ViT-L/14@336px": (1024, 24, 16, 14, 24, 768),
                 "ViT-B/16": (768, 12, 12, 16, 14, 512)}


class DualAttention(nn.Module):
    """The reference's DPAM attention: returns (V-V output, vanilla output), shared projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape  # batch-first inside, as the reference transposes around the call
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn_ori = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        attn_vv = ((v @ v.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x_ori = (attn_ori @ v).transpose(1, 2).reshape(b, n, c)
        x_vv = (attn_vv @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x_vv), self.proj(x_ori)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """OpenAI's residual block; with `dual` the reference's two-stream form (spec section 2.4)."""

    def __init__(self, width: int, heads: int, dual: bool):
        super().__init__()
        self.dual = dual
        self.attn = DualAttention(width, heads) if dual else nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), QuickGELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, x_vv: torch.Tensor | None):
        """x, x_vv: (N, B, C) sequence-first."""
        if not self.dual:
            h = self.ln_1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x)), None
        vv, ori = self.attn(self.ln_1(x).transpose(0, 1))
        x_vv = (x if x_vv is None else x_vv) + vv.transpose(0, 1)
        x = x + ori.transpose(0, 1)
        return x + self.mlp(self.ln_2(x)), x_vv


class VisionTower(nn.Module):
    def __init__(self, width, layers, heads, patch, grid, output_dim, dpam_start):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width**-0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            Block(width, heads, dual=0 < dpam_start <= i) for i in range(1, layers + 1))
        self.proj = nn.Parameter(torch.randn(width, output_dim) * width**-0.5)

    def forward(self, images: torch.Tensor, taps: tuple[int, ...]):
        x = self.conv1(images)  # (B, C, h, w)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(b, 1, c), x], dim=1)
        pos = self.positional_embedding
        side = int((pos.shape[0] - 1) ** 0.5)
        grid = pos[1:].reshape(1, side, side, c).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid, (h, w), mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:1], grid.reshape(c, h * w).T], dim=0)
        x = self.ln_pre(x + pos).permute(1, 0, 2)
        x_vv, out = None, []
        for i, block in enumerate(self.blocks, start=1):
            x, x_vv = block(x, x_vv)
            if i in taps:
                out.append(x if x_vv is None else x_vv)
        tokens = [self.ln_post(t.permute(1, 0, 2)) @ self.proj for t in out]
        return x[0] @ self.proj, tokens


def measure(arch: str, image_size: int, batch: int, taps, dpam_start: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = VisionTower(*ARCHITECTURES[arch], dpam_start=dpam_start).eval()
    images = torch.randn(batch, 3, image_size, image_size)
    with torch.no_grad():
        start = time.perf_counter()
        model(images, taps)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images, taps)
            times.append(time.perf_counter() - start)
    step = sum(times) / repeats
    return {
        "benchmark": "vision_forward_torch", "arch": arch, "image_size": image_size,
        "batch": batch, "dtype": "float32", "taps": list(taps), "device": platform.processor()
        or "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "first_call_s": round(first, 3), "step_s": round(step, 4),
        "step_min_s": round(min(times), 4), "images_per_s": round(batch / step, 3),
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-L/14@336px", choices=sorted(ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--taps", default="6,12,18,24")
    parser.add_argument("--dpam-start", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    taps = tuple(int(t) for t in args.taps.split(","))
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        print(json.dumps(measure(args.arch, args.image_size, batch, taps, args.dpam_start,
                                 args.repeats)), flush=True)


if __name__ == "__main__":
    main()
