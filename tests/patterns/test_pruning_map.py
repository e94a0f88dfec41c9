"""The pruning-map PNG: a valid file whose pixels are the tile map, decoded here independently of the writer."""
import struct
import zlib

import pytest
import torch

from acp_compile.kernels.plan import kept_tiles, make_plan
from acp_compile.pruning_map import (
    COMPUTED, OUTSIDE, SKIPPED, causal_tile_mask, render_pruning_map, write_pruning_map_png,
)


def decode_grey_png(data: bytes) -> torch.Tensor:
    """Minimal PNG reader for 8-bit greyscale, non-interlaced files: checks every CRC, undoes filters 0-4."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "bad PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data), "trailing bytes after the last chunk"
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 0, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (width + 1)
    out, prev = [], [0] * width
    for r in range(height):
        ftype, line = raw[r * (width + 1)], list(raw[r * (width + 1) + 1:(r + 1) * (width + 1)])
        for x in range(width):
            a = line[x - 1] if x else 0
            b, c = prev[x], (prev[x - 1] if x else 0)
            if ftype == 1:
                line[x] = (line[x] + a) & 255
            elif ftype == 2:
                line[x] = (line[x] + b) & 255
            elif ftype == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            else:
                assert ftype == 0, f"unknown filter {ftype}"
        out.append(line)
        prev = line
    return torch.tensor(out, dtype=torch.uint8)


def expected_pixels(kept, causal, scale):
    tiles = torch.where(kept, COMPUTED, torch.where(causal, SKIPPED, OUTSIDE)).to(torch.uint8)
    return torch.kron(tiles, torch.ones(scale, scale, dtype=torch.uint8))


@pytest.mark.parametrize("Tq,Tk,bm,bn,scale", [(70, 70, 16, 16, 3), (40, 100, 16, 32, 5), (1, 33, 16, 8, 2)])
def test_png_of_a_real_plan_has_the_tile_map_as_pixels(tmp_path, Tq, Tk, bm, bn, scale):
    torch.manual_seed(Tq * 7 + Tk)
    q, k = torch.randn(1, 2, Tq, 16), torch.randn(1, 1, Tk, 16)
    c = torch.cumsum(-torch.rand(1, 2, Tk) * 2.0, dim=-1)                 # strong decay: many skipped tiles
    plan = make_plan(q, k, c, 0.25, -10.0, None, bm, bn)
    kept = kept_tiles(plan)[0, 1]
    causal = causal_tile_mask(Tq, Tk, bm, bn)
    assert torch.equal(causal, torch.arange(causal.shape[1])[None, :] <= plan.n_hi[:, None])
    path = tmp_path / "map.png"
    width, height = write_pruning_map_png(kept, path, causal_tiles=causal, scale=scale)
    pixels = decode_grey_png(path.read_bytes())
    assert (width, height) == (causal.shape[1] * scale, causal.shape[0] * scale) == (pixels.shape[1], pixels.shape[0])
    assert torch.equal(pixels, expected_pixels(kept, causal, scale))
    if Tq == Tk == 70:     # the strong decay must leave both kinds of causal tile, or the test shows nothing
        assert (pixels == COMPUTED).any() and (pixels == SKIPPED).any() and (pixels == OUTSIDE).any()


def test_random_maps_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    for i in range(5):
        Mq, Nk = torch.randint(1, 12, (2,), generator=g).tolist()
        causal = torch.rand(Mq, Nk, generator=g) < 0.7
        kept = causal & (torch.rand(Mq, Nk, generator=g) < 0.5)
        path = tmp_path / f"m{i}.png"
        write_pruning_map_png(kept, path, causal_tiles=causal, scale=i + 1)
        assert torch.equal(decode_grey_png(path.read_bytes()), expected_pixels(kept, causal, i + 1))


def test_without_causal_map_every_tile_not_kept_is_skipped():
    kept = torch.tensor([[True, False], [False, True]])
    assert torch.equal(render_pruning_map(kept, scale=1), torch.tensor([[COMPUTED, SKIPPED], [SKIPPED, COMPUTED]],
                                                                        dtype=torch.uint8))


@pytest.mark.parametrize("bad,match", [
    (dict(kept=torch.ones(2, 2, 2, dtype=torch.bool)), "2-d"),
    (dict(kept=torch.ones(2, 2)), "bool"),
    (dict(causal=torch.ones(2, 3, dtype=torch.bool)), "shape"),
    (dict(causal=torch.zeros(2, 2, dtype=torch.bool)), "outside causal_tiles"),
    (dict(scale=0), "scale"),
    (dict(scale=1 << 15), "smaller scale"),
])
def test_bad_inputs_say_what_to_fix(bad, match):
    kept = bad.get("kept", torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=match):
        render_pruning_map(kept, bad.get("causal"), scale=bad.get("scale", 2))
