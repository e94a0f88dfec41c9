"""Draw an ACP pruning map (which attention tiles were computed) as a PNG, with no plotting library.

Notation: a tile (m, n) covers query block m and key block n (see kernels/plan.py).
  kept_tiles   (Mq, Nk) bool: True where the kernels computed the tile
  causal_tiles (Mq, Nk) bool: True where the tile holds at least one causal entry (j <= i);
               tiles outside it are never computed and are drawn white

Pixels (8-bit grey, one square of `scale` x `scale` pixels per tile, row m at the top):
  COMPUTED = 40 (dark)      a causal tile that was computed
  SKIPPED  = 190 (light)    a causal tile that ACP skipped
  OUTSIDE  = 255 (white)    a tile above the causal diagonal
The PNG is written with zlib and struct only (greyscale, bit depth 8, filter 0 on every row).
"""
from __future__ import annotations

import os
import struct
import zlib

import torch
from torch import Tensor

COMPUTED = 40
SKIPPED = 190
OUTSIDE = 255

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_SIDE = 1 << 15        # pixels; a larger map is almost certainly a mistake in `scale`


def causal_tile_mask(Tq: int, Tk: int, block_m: int, block_n: int) -> Tensor:
    """(Mq, Nk) bool: tiles holding a causal entry when the Tq queries are the last Tq of Tk positions."""
    if Tq < 1 or Tk < Tq or block_m < 1 or block_n < 1:
        raise ValueError(f"causal_tile_mask: need 1 <= Tq <= Tk and positive blocks, got "
                         f"Tq={Tq}, Tk={Tk}, block_m={block_m}, block_n={block_n}")
    Mq, Nk = -(-Tq // block_m), -(-Tk // block_n)
    last_row = torch.clamp((torch.arange(Mq) + 1) * block_m, max=Tq) - 1          # (Mq,)
    last_causal_key_block = (Tk - Tq + last_row) // block_n                        # (Mq,)
    return torch.arange(Nk)[None, :] <= last_causal_key_block[:, None]             # (Mq, Nk)


def render_pruning_map(kept_tiles: Tensor, causal_tiles: Tensor | None = None, *, scale: int = 8) -> Tensor:
    """(Mq*scale, Nk*scale) uint8 grey image of the tile map (see the module header for the values).

    causal_tiles None: every tile counts as causal (a tile not kept is drawn as skipped).
    """
    kept = _as_tile_map(kept_tiles, "kept_tiles")
    if causal_tiles is None:
        causal = torch.ones_like(kept)
    else:
        causal = _as_tile_map(causal_tiles, "causal_tiles")
        if causal.shape != kept.shape:
            raise ValueError(f"render_pruning_map: causal_tiles {tuple(causal.shape)} must have the shape of "
                             f"kept_tiles {tuple(kept.shape)}")
        if bool((kept & ~causal).any()):
            raise ValueError("render_pruning_map: a kept tile lies outside causal_tiles; were the two maps made "
                             "with the same block sizes and sequence lengths?")
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"render_pruning_map: scale must be a positive int (pixels per tile), got {scale!r}")
    Mq, Nk = kept.shape
    if max(Mq, Nk) * scale > _MAX_SIDE:
        raise ValueError(f"render_pruning_map: a {Mq}x{Nk} map at scale {scale} exceeds {_MAX_SIDE} pixels a "
                         f"side; pass a smaller scale")
    tiles = torch.full(kept.shape, OUTSIDE, dtype=torch.uint8)
    tiles[causal] = SKIPPED
    tiles[kept] = COMPUTED
    return tiles.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)


def encode_png_grey(pixels: Tensor) -> bytes:
    """PNG bytes of a (height, width) uint8 grey image."""
    if pixels.dim() != 2 or pixels.dtype != torch.uint8:
        raise ValueError(f"encode_png_grey: need a 2-d uint8 tensor, got {pixels.dtype} {tuple(pixels.shape)}")
    height, width = pixels.shape
    if height < 1 or width < 1:
        raise ValueError("encode_png_grey: the image is empty")
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), pixels.cpu()], dim=1)   # filter byte 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)   # bit depth 8, grey, deflate, filter, no interlace
    return (PNG_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.contiguous().numpy().tobytes(), 9))
            + _chunk(b"IEND", b""))


def write_pruning_map_png(
    kept_tiles: Tensor, path: str | os.PathLike, *, causal_tiles: Tensor | None = None, scale: int = 8,
) -> tuple[int, int]:
    """Write the pruning map of one (batch, head) to `path` as a PNG; returns (width, height) in pixels.

    kept_tiles (Mq, Nk) bool, for example `kernels.plan.kept_tiles(plan)[b, h]`; causal_tiles (Mq, Nk) bool,
    for example `causal_tile_mask(Tq, Tk, plan.block_m, plan.block_n)`, marks the tiles drawn grey or dark
    (the rest is white). Each tile becomes a square of scale x scale pixels.
    """
    image = render_pruning_map(kept_tiles, causal_tiles, scale=scale)
    with open(path, "wb") as f:
        f.write(encode_png_grey(image))
    return image.shape[1], image.shape[0]


def _as_tile_map(tiles: Tensor, name: str) -> Tensor:
    if not isinstance(tiles, Tensor) or tiles.dim() != 2:
        got = tuple(tiles.shape) if isinstance(tiles, Tensor) else type(tiles).__name__
        raise ValueError(f"{name} must be a 2-d (query blocks, key blocks) tensor; got {got}. "
                         f"Select one batch element and head first, e.g. kept_tiles(plan)[b, h]")
    if tiles.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {tiles.dtype}")
    return tiles.detach().cpu()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
