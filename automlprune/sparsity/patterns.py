"""Weight sparsity patterns: which individual weights of a Conv2d/Linear layer a mask may remove.

A layer's weight is seen as a matrix (:func:`matrix_view`): one row per output channel, its
columns in channels-last order (for a conv, kernel row, kernel column, input channel within
the convolution group, the last varying fastest; for a linear, its input features). Runs of
consecutive columns are then consecutive input channels at one kernel position, the order
NVIDIA's 2:4 masks use for convolutions (ASP permutes a conv weight to (out, kh, kw, in) before
grouping) and the order of ``torch.ao.pruning``'s (1, 4) blocks for linear layers.

Families (a pattern is written as in a candidate or a space file):

* ``unstructured``: any weights; a layer at density d keeps round(d x weights) of them
  (at least one), those with the highest scores.
* ``N:M`` (e.g. ``2:4``): in every run of M consecutive columns of a row, the N highest-scoring
  weights; the density is N/M exactly. The input channels per group must be a multiple of M.
* ``block:RxC`` (e.g. ``block:1x4``): whole R x C blocks of the matrix, those with the highest
  summed score; round(d x blocks) blocks kept (at least one). The rows (kept output channels)
  must be a multiple of R and the input channels per group a multiple of C.
* ``pconv`` (``pconv:K``, K = 8 by default): PCONV's kernel patterns and connectivity pruning
  (Ma et al., AAAI 2020) for 3 x 3 convolutions. Every kept kernel keeps 4 of its 9 weights in
  one of K patterns, the layer's library: the K most frequent "centre plus the 3 highest-scoring
  others" shapes of its kernels (the library rule of the third-party PatDNN code, per layer
  here, where PatDNN builds one library for the network); each kernel takes the library
  pattern with the highest summed score, and whole kernels are removed (connectivity pruning),
  those whose pattern scores lowest, so that round(d x 9/4 x kernels) kernels stay. The
  density is at most 4/9. No official PCONV code exists. The pattern is cut from trained
  weights here; the ``pconv-admm`` strategy (:mod:`automlprune.search.pconv_admm`) trains the
  weights towards it by ADMM first.
* ``kernel``: connectivity pruning of whole kernels: the kh x kw weights one output channel
  reads from one input channel are kept or removed together, those with the highest summed
  score kept; round(d x kernels) kernels stay (at least one). For convolutions with kernels of
  more than one weight (a 1 x 1 convolution or a Linear layer has none: use ``unstructured``).
  The pattern of the information-dropout stage of the two-stage DRL pipeline
  (:mod:`automlprune.search.information_dropout`) and of PCONV's connectivity part alone.
* ``darb`` (``darb:B``, B = 64 by default): DARB, density-adaptive regular blocks (Ren et al.,
  AAAI 2020). Each row i gets a block size b_i, a power of two up to B (and up to the row's
  length), and keeps the highest-scoring weight of each of its ceil(C / b_i) blocks of b_i
  consecutive columns (block-max weight masking, BMWM); a kept weight stores only its offset in
  its block, ceil(log2 b_i) bits. The block sizes follow the rows' densities in a reference
  mask, the unstructured top round(d x weights) of the same scores (the paper's irregular
  reference mask): starting from the largest block everywhere, the row whose reference density
  is highest relative to its current density 1/b_i has its block halved, again and again, while
  the layer stays within its two limits below: b_i ~ 1 / (s d_i) for a common scale s, the
  paper's "block size adapted to row density, scaled to the budget". No official DARB code
  exists; this rule, the power-of-two sizes and the reference mask are our reading of the
  paper (arXiv 1911.08020), and its iterative prune / retrain schedule is replaced by one masked
  fine-tune.

Every kept count except DARB's depends only on the layer's shape and density, never on the
weights, so the cost model knows a candidate's storage exactly before any network is built
(:mod:`automlprune.cost.formats`). DARB's block sizes depend on the weights, so its layers have
shape-only *limits* instead: at most K = max(round(d x weights), rows x ceil(C / largest block))
weights kept, and at most max(K max(1, ceil(log2(weights / K))), rows x ceil(C / largest
block) x log2(largest block)) offset bits in all (the limits of uniform block-max masking at
block weights / K, which the rows' blocks trade between them). Before the weights are known the
cost model charges those limits (upper bounds); the evaluator and the export charge what the
materialized masks keep (:func:`automlprune.cost.formats.layout_of` with a mask), so a
network's reported size is its file's.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

from automlprune.errors import CandidateError


def matrix_view(weight: torch.Tensor) -> torch.Tensor:
    """A Conv2d (out, in/groups, kh, kw) or Linear (out, in) weight as the (out, columns)
    matrix patterns act on, columns in channels-last order (see the module docstring)."""
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`matrix_view`: the (out, columns) matrix back in the weight's ``shape``."""
    if len(shape) == 4:
        out, inputs, kh, kw = shape
        return matrix.reshape(out, kh, kw, inputs).permute(0, 3, 1, 2).contiguous()
    return matrix.reshape(tuple(shape))


@dataclass(frozen=True)
class Geometry:
    """A layer's weight matrix as patterns see it: ``rows`` (output channels), ``inputs`` (input
    channels per convolution group, or input features) and ``kernel`` (kh x kw; 1 for linear).
    Columns = inputs x kernel; weights = rows x columns."""

    rows: int
    inputs: int
    kernel: int = 1

    @property
    def columns(self) -> int:
        return self.inputs * self.kernel

    @property
    def weights(self) -> int:
        return self.rows * self.columns

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Geometry":
        return cls(int(weight.shape[0]), int(weight.shape[1]), int(weight[0, 0].numel()))


class Pattern:
    """One sparsity pattern. ``name``: its canonical spelling; ``family``: the family it belongs
    to; ``fixed_density``: the only density it allows (N:M), else None; ``run``: the N:M group
    length M (None for others); ``block``: (R, C) of a block pattern (None for others)."""

    name: str
    family: str
    fixed_density: Optional[float] = None
    max_density: float = 1.0
    run: Optional[int] = None
    block: Optional[tuple[int, int]] = None
    library: Optional[int] = None
    whole_kernels: bool = False
    """True when the pattern keeps or removes whole kernels (``kernel``)."""
    largest_block: Optional[int] = None
    exact_count: bool = True
    """False when :meth:`kept` is an upper bound the mask may stay below (DARB)."""

    def clip(self, density: float) -> float:
        """``density`` as the pattern can have it: its fixed density, or at most its maximum."""
        return self.fixed_density if self.fixed_density is not None else min(density, self.max_density)

    def kept_kernels(self, geometry: "Geometry", density: float) -> int:
        """Kernels kept (the families that keep whole kernels: pconv, kernel)."""
        raise NotImplementedError

    def why_not(self, geometry: Geometry) -> Optional[str]:
        """Why the pattern cannot apply to a layer of this geometry (None when it can)."""
        return None

    def check(self, layer: str, geometry: Geometry) -> None:
        """Raise :class:`CandidateError` when the pattern cannot apply to ``layer`` of ``geometry``."""
        why = self.why_not(geometry)
        if why is not None:
            raise CandidateError(f"sparsity pattern {self.name} cannot apply to layer '{layer}': {why}; "
                                 "give that layer another pattern or leave it dense")

    def kept(self, geometry: Geometry, density: float) -> int:
        """Weights kept at ``density`` (a function of the shape only)."""
        raise NotImplementedError

    def kept_blocks(self, geometry: Geometry, density: float) -> int:
        """Blocks kept (block patterns only)."""
        raise NotImplementedError

    def offset_budget(self, geometry: Geometry, density: float) -> int:
        """Offset bits a DARB layer may use in all (DARB only)."""
        raise NotImplementedError

    def realized(self, mask: torch.Tensor) -> tuple[int, int]:
        """(weights kept, offset bits) of a mask of a pattern whose count is a limit (DARB only)."""
        raise NotImplementedError

    def mask_layer(self, scores: torch.Tensor, density: float, geometry: "Geometry") -> torch.Tensor:
        """:meth:`mask` of a layer of ``geometry`` (patterns that need the kernel size read it here)."""
        return self.mask(scores, density)

    def mask(self, scores: torch.Tensor, density: float) -> torch.Tensor:
        """Boolean mask (the shape of the (rows, columns) matrix ``scores``): True = kept;
        exactly :meth:`kept` entries are True (at most, when ``exact_count`` is False), the
        highest-scoring ones the pattern allows."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Pattern({self.name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def _count(density: float, total: int) -> int:
    return int(min(total, max(1, round(density * total))))


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` largest entries of the 1-D ``scores`` (ties: lower index first)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:count]] = True
    return keep


class Unstructured(Pattern):
    name = family = "unstructured"

    def kept(self, geometry, density):
        return _count(density, geometry.weights)

    def mask(self, scores, density):
        rows, columns = scores.shape
        return _top(scores.reshape(-1), self.kept(Geometry(rows, columns), density)).reshape(scores.shape)


class NM(Pattern):
    """N of every M consecutive columns of a row (semi-structured sparsity)."""

    family = "n:m"

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = n, m
        self.name, self.fixed_density, self.run = f"{n}:{m}", n / m, m

    def why_not(self, geometry):
        if geometry.inputs % self.m:
            return f"its {geometry.inputs} input channels per group are not a multiple of {self.m}"
        return None

    def kept(self, geometry, density):
        return geometry.weights // self.m * self.n

    def mask(self, scores, density):
        rows, columns = scores.shape
        runs = scores.reshape(rows, columns // self.m, self.m).double()
        order = torch.argsort(runs, dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(runs, dtype=torch.bool)
        keep.scatter_(-1, order[..., : self.n], True)
        return keep.reshape(rows, columns)


class Block(Pattern):
    """Whole R x C blocks of the weight matrix."""

    family = "block"

    def __init__(self, r: int, c: int) -> None:
        self.block, self.name = (r, c), f"block:{r}x{c}"

    def why_not(self, geometry):
        r, c = self.block
        if geometry.rows % r:
            return f"its {geometry.rows} output channels are not a multiple of {r} (set the space's round_to to a multiple of {r})"
        if geometry.inputs % c:
            return f"its {geometry.inputs} input channels per group are not a multiple of {c}"
        return None

    def kept_blocks(self, geometry, density):
        r, c = self.block
        return _count(density, geometry.weights // (r * c))

    def kept(self, geometry, density):
        return self.kept_blocks(geometry, density) * self.block[0] * self.block[1]

    def mask(self, scores, density):
        r, c = self.block
        rows, columns = scores.shape
        tiles = scores.double().reshape(rows // r, r, columns // c, c).sum(dim=(1, 3))
        keep = _top(tiles.reshape(-1), self.kept_blocks(Geometry(rows, columns), density)).reshape(tiles.shape)
        return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)


class PConv(Pattern):
    """PCONV kernel patterns with connectivity pruning (see the module docstring)."""

    family = "pconv"
    ENTRIES = 4
    CENTRE = 4  # index of the centre in a row-major 3 x 3 kernel

    def __init__(self, library: int = 8) -> None:
        self.library, self.name, self.max_density = library, ("pconv" if library == 8 else f"pconv:{library}"), 4 / 9

    def why_not(self, geometry):
        return None if geometry.kernel == 9 else f"PCONV patterns need 3 x 3 kernels, it has {geometry.kernel} weights per kernel"

    def kept_kernels(self, geometry, density):
        return _count(min(1.0, density * 9 / self.ENTRIES), geometry.rows * geometry.inputs)

    def kept(self, geometry, density):
        return self.ENTRIES * self.kept_kernels(geometry, density)

    @staticmethod
    def kernels(matrix: torch.Tensor) -> torch.Tensor:
        """A (rows, columns) pattern matrix of a 3 x 3 layer as its (rows x inputs, 9) kernels, row-major."""
        rows, columns = matrix.shape
        return matrix.reshape(rows, 3, 3, columns // 9).permute(0, 3, 1, 2).reshape(rows * (columns // 9), 9)

    @staticmethod
    def from_kernels(kernels: torch.Tensor, rows: int) -> torch.Tensor:
        """Inverse of :meth:`kernels`."""
        inputs = kernels.shape[0] // rows
        return kernels.reshape(rows, inputs, 3, 3).permute(0, 2, 3, 1).reshape(rows, inputs * 9)

    def mask(self, scores, density):
        rows, columns = scores.shape
        inputs = columns // 9
        kernels = self.kernels(scores.double())
        library = self.library_of(kernels)
        fit = kernels @ library.T.double()  # (kernels, K): summed score of each library pattern
        best, choice = fit.max(dim=1)
        keep = _top(best, self.kept_kernels(Geometry(rows, inputs, 9), density))
        return self.from_kernels(library[choice] & keep[:, None], rows)

    def library_of(self, kernels: torch.Tensor) -> torch.Tensor:
        """The K most frequent centre-plus-top-3 shapes of ``kernels`` (n, 9) as a (K', 9) boolean
        tensor (K' <= K; ties: the lower shape code first). Kernels scoring zero everywhere (removed
        ones) have no shape and are not counted, so a network already pruned to PCONV masks gets its
        own library back."""
        nonzero = kernels.ne(0).any(dim=1)
        if nonzero.any():
            kernels = kernels[nonzero]
        others = kernels.clone()
        others[:, self.CENTRE] = -torch.inf
        shapes = torch.zeros_like(kernels, dtype=torch.bool)
        shapes[:, self.CENTRE] = True
        shapes.scatter_(1, torch.topk(others, self.ENTRIES - 1, dim=1).indices, True)
        codes = (shapes.long() << torch.arange(9)).sum(1)
        unique, counts = torch.unique(codes, return_counts=True)
        order = sorted(range(len(unique)), key=lambda i: (-int(counts[i]), int(unique[i])))[: self.library]
        chosen = unique[order]
        return ((chosen[:, None] >> torch.arange(9)) & 1).bool()


class Kernel(Pattern):
    """Whole kh x kw kernels (connectivity pruning; see the module docstring)."""

    name = family = "kernel"
    whole_kernels = True

    def why_not(self, geometry):
        if geometry.kernel < 2:
            return "its kernels hold one weight each (a 1 x 1 convolution or a Linear layer), so there is no kernel to remove whole; give it unstructured"
        return None

    def kept_kernels(self, geometry, density):
        return _count(density, geometry.rows * geometry.inputs)

    def kept(self, geometry, density):
        return self.kept_kernels(geometry, density) * geometry.kernel

    @staticmethod
    def kernel_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
        """The (rows, columns) channels-last matrix ``scores`` summed per kernel: (rows, inputs)."""
        rows, columns = scores.shape
        return scores.double().reshape(rows, kernel, columns // kernel).sum(dim=1)

    def mask_layer(self, scores, density, geometry):
        rows = scores.shape[0]
        per_kernel = self.kernel_scores(scores, geometry.kernel)
        keep = _top(per_kernel.reshape(-1), self.kept_kernels(geometry, density)).reshape(per_kernel.shape)
        return keep[:, None, :].expand(rows, geometry.kernel, per_kernel.shape[1]).reshape(scores.shape)

    def mask(self, scores, density):
        raise TypeError("kernel masks need the layer's kernel size: call mask_layer")


def block_max(scores: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Block-max weight masking: in each row i of the (rows, columns) ``scores``, the
    highest-scoring entry of each of its ceil(columns / sizes[i]) blocks of ``sizes[i]``
    consecutive columns (the last block may be shorter; ties: the first)."""
    rows, columns = scores.shape
    keep = torch.zeros(rows, columns, dtype=torch.bool, device=scores.device)
    for size in torch.unique(sizes).tolist():
        members = torch.nonzero(sizes == size).flatten()
        blocks = -(-columns // size)
        padded = torch.full((len(members), blocks * size), -torch.inf, dtype=torch.float64, device=scores.device)
        padded[:, :columns] = scores[members].double()
        best = padded.reshape(len(members), blocks, size).argmax(dim=-1) + torch.arange(blocks, device=scores.device) * size
        rows_keep = torch.zeros(len(members), columns, dtype=torch.bool, device=scores.device)
        rows_keep.scatter_(1, best, True)
        keep[members] = rows_keep
    return keep


def offset_bits(size: int) -> int:
    """Bits of a kept weight's offset in a DARB block of ``size`` columns: ceil(log2 size) (0 for 1)."""
    return (int(size) - 1).bit_length()


class DARB(Pattern):
    """Density-adaptive regular blocks with block-max weight masking (see the module docstring)."""

    family = "darb"
    exact_count = False

    def __init__(self, largest: int = 64) -> None:
        self.largest_block, self.name = largest, ("darb" if largest == 64 else f"darb:{largest}")

    def largest_for(self, columns: int) -> int:
        """The layer's largest block: B, or the largest power of two within a row of ``columns``."""
        return min(self.largest_block, 1 << (max(columns, 1).bit_length() - 1))

    def sizes(self, columns: int) -> list[int]:
        """The block sizes a row may take: powers of two up to :meth:`largest_for`."""
        return [1 << e for e in range(self.largest_for(columns).bit_length())]

    def _floor(self, geometry: Geometry) -> tuple[int, int]:
        """(weights, offset bits) of the sparsest allocation, every row at the largest block."""
        largest = self.largest_for(geometry.columns)
        per_row = -(-geometry.columns // largest)
        return geometry.rows * per_row, geometry.rows * per_row * offset_bits(largest)

    def kept(self, geometry, density):
        return max(_count(density, geometry.weights), self._floor(geometry)[0])

    def offset_budget(self, geometry, density):
        kept = self.kept(geometry, density)
        return max(kept * max(1, offset_bits(math.ceil(geometry.weights / kept))), self._floor(geometry)[1])

    def allocate(self, scores: torch.Tensor, density: float) -> torch.Tensor:
        """Each row's block size (a (rows,) long tensor) for the (rows, columns) ``scores``."""
        rows, columns = scores.shape
        geometry = Geometry(rows, columns)
        limit, offsets = self.kept(geometry, density), self.offset_budget(geometry, density)
        reference = Unstructured().mask(scores, min(1.0, limit / geometry.weights)).sum(dim=1).double() / columns
        size = [self.largest_for(columns)] * rows
        kept = [-(-columns // s) for s in size]
        used_kept, used_offsets = sum(kept), sum(k * offset_bits(s) for k, s in zip(kept, size))
        # max-heap on reference density x current block (how far the row is below its reference)
        heap = [(-float(reference[i]) * size[i], i) for i in range(rows) if size[i] > 1]
        heapq.heapify(heap)
        while heap:
            _, i = heapq.heappop(heap)
            half = size[i] // 2
            more = -(-columns // half)
            grown_kept = used_kept + more - kept[i]
            grown_offsets = used_offsets + more * offset_bits(half) - kept[i] * offset_bits(size[i])
            if grown_kept > limit or grown_offsets > offsets:
                continue  # this row cannot grow within the limits; the others may
            size[i], kept[i], used_kept, used_offsets = half, more, grown_kept, grown_offsets
            if half > 1:
                heapq.heappush(heap, (-float(reference[i]) * half, i))
        return torch.tensor(size, dtype=torch.long)

    def mask(self, scores, density):
        return block_max(scores, self.allocate(scores, density).to(scores.device))

    def realized(self, mask: torch.Tensor) -> tuple[int, int]:
        """(weights kept, offset bits) of a DARB ``mask`` (rows, columns): what its layer really
        stores, within the limits :meth:`kept` and :meth:`offset_budget`."""
        columns = mask.shape[1]
        counts = mask.sum(dim=1).tolist()
        by_count = {-(-columns // size): size for size in self.sizes(columns)}
        return int(sum(counts)), int(sum(k * offset_bits(by_count.get(k, 1)) for k in counts))


FAMILIES = ("unstructured", "n:m", "block", "pconv", "kernel", "darb")
"""The pattern families, as a space's ``sparsity.patterns`` may list them (``N:M`` and ``block:RxC`` with their sizes)."""

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK = re.compile(r"^\s*block\s*:\s*(\d+)\s*x\s*(\d+)\s*$")
_PCONV = re.compile(r"^\s*pconv\s*(?::\s*(\d+))?\s*$")
_DARB = re.compile(r"^\s*darb\s*(?::\s*(\d+))?\s*$")


def parse_pattern(text: object) -> Pattern:
    """The pattern ``text`` names (``unstructured``, ``N:M`` such as ``2:4``, ``block:RxC`` such as
    ``block:1x4``); one sentence when it names none."""
    spelled = str(text).strip().lower()
    if spelled == "unstructured":
        return Unstructured()
    match = _NM.match(spelled)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 1 <= n < m:
            raise CandidateError(f"sparsity pattern '{text}' needs 1 <= N < M (N of every M weights kept), such as 2:4")
        return NM(n, m)
    match = _BLOCK.match(spelled)
    if match:
        r, c = int(match.group(1)), int(match.group(2))
        if r < 1 or c < 1 or r * c < 2:
            raise CandidateError(f"sparsity pattern '{text}' needs blocks of at least two weights, such as block:1x4")
        return Block(r, c)
    match = _PCONV.match(spelled)
    if match:
        library = int(match.group(1) or 8)
        if not 1 <= library <= 56:  # C(8, 3) = 56 centre-plus-3 shapes exist
            raise CandidateError(f"sparsity pattern '{text}' needs a library of 1 to 56 kernel patterns, such as pconv:8")
        return PConv(library)
    if spelled == "kernel":
        return Kernel()
    match = _DARB.match(spelled)
    if match:
        largest = int(match.group(1) or 64)
        if largest < 2 or largest & (largest - 1):
            raise CandidateError(f"sparsity pattern '{text}' needs its largest block to be a power of two of at least 2, such as darb:64")
        return DARB(largest)
    raise CandidateError(f"unknown sparsity pattern '{text}'; use unstructured, N:M (such as 2:4), block:RxC (such as block:1x4), "
                         "pconv, kernel or darb")


def check_density(density: object, where: str) -> float:
    """``density`` as a float in (0, 1], or one sentence naming ``where`` it was given."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < float(density) <= 1:
        raise CandidateError(f"weight density {density!r} for {where} is outside (0, 1]; give the fraction of weights kept, such as 0.25")
    return float(density)
