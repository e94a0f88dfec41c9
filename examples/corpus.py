"""A byte-level text corpus that every Python installation already has: the standard library's source.

Files: every *.py under sysconfig.get_paths()["stdlib"], except installed third-party packages
(site-packages, dist-packages) and caches, in sorted order of their path relative to the stdlib root,
so the corpus is the same on every run of one Python installation. Each file is one document; every
`heldout_every`-th file (in that order) goes to the held-out split, so no file is in both splits.
Tokens are the file's bytes (vocabulary 256), documents joined by a NUL byte.
"""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
DOCUMENT_SEPARATOR = b"\x00"
VOCAB_SIZE = 256


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """The stdlib's *.py files in a deterministic order (sorted relative POSIX paths)."""
    root = stdlib_root() if root is None else root
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts)]
    files = [p for p in files if p.is_file()]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(
            f"no Python source files under the standard library at {root}; this Python installation "
            "ships without sources (for example an embedded build): point --corpus-root at a folder of .py files")
    return files


@dataclass(frozen=True)
class ByteCorpus:
    train: Tensor      # (N_train,) uint8
    heldout: Tensor    # (N_heldout,) uint8
    n_files: int

    def split(self, name: str) -> Tensor:
        if name not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {name!r}")
        return self.train if name == "train" else self.heldout


def load_corpus(root: Path | None = None, heldout_every: int = 20, max_bytes: int | None = None) -> ByteCorpus:
    """Reads the stdlib sources into two byte tensors. max_bytes caps the bytes read (both splits
    together, files taken in order) to keep a quick run quick."""
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2 (one file in that many is held out), got {heldout_every}")
    train_parts, heldout_parts, total, n_files = [], [], 0, 0
    for i, path in enumerate(stdlib_source_files(root)):
        data = path.read_bytes() + DOCUMENT_SEPARATOR
        (heldout_parts if i % heldout_every == heldout_every - 1 else train_parts).append(data)
        total += len(data)
        n_files += 1
        if max_bytes is not None and total >= max_bytes:
            break
    if not heldout_parts:
        raise ValueError(f"max_bytes={max_bytes} is too small to reach a held-out file; raise it")

    def to_tensor(parts: list[bytes]) -> Tensor:
        return torch.from_numpy(np.frombuffer(b"".join(parts), dtype=np.uint8).copy())

    return ByteCorpus(train=to_tensor(train_parts), heldout=to_tensor(heldout_parts), n_files=n_files)


class BatchSampler:
    """Random (input, target) windows of one split, from a seeded generator: two samplers with the
    same seed yield the same batches, so runs under different backends see the same data."""

    def __init__(self, data: Tensor, batch_size: int, seq_len: int, seed: int):
        if data.numel() <= seq_len + 1:
            raise ValueError(f"the split holds {data.numel()} bytes, fewer than seq_len + 1 = {seq_len + 1}")
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, self.data.numel() - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        offsets = torch.arange(self.seq_len + 1)
        window = self.data[starts[:, None] + offsets].long()                  # (B, T + 1)
        return window[:, :-1].to(device), window[:, 1:].to(device)


def decode_bytes(tokens: Tensor) -> str:
    return bytes(tokens.to(torch.uint8).cpu().tolist()).decode("utf-8", errors="replace")


def encode_text(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
