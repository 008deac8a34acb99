"""Storage formats of a Conv2d/Linear weight, each with its honest size and its packing.

A layer's weight is stored in the smallest format its mask admits (:func:`smallest`); the cost
model's ``bytes`` counts that size and the packed export (:mod:`automlprune.export`) writes
exactly those arrays, so the file is the reported size plus byte padding and metadata.

Notation: the weight as its pattern matrix (:func:`automlprune.sparsity.patterns.matrix_view`)
of R rows and C columns, N = R x C weights of which k are kept, values of b bits (the layer's
weight bits: quantization codes, or the float32 bit pattern at 32), and w(n) = max(1,
ceil(log2 n)) the bits of an index taking n values. Sizes in bits:

========================  ======================================================  ===========
format                    bits                                                    admits
========================  ======================================================  ===========
``dense``                 N b                                                     any mask
``bitmask``               N + k b (one bit per weight, then the kept values)      any mask
``csr``                   (R + 1) w(k + 1) + k (w(C) + b) (row pointers,          any mask
                          column indices and values at their minimal widths)
``n:m``                   k (w(M) + b) (each kept value's position in its run)    N:M masks
``bsr``                   (R/r + 1) w(K + 1) + K w(C/c) + K r c b for K kept r x c  block masks
                          blocks (block row pointers, block columns, values)
``block-bitmask``         (R/r)(C/c) + K r c b                                    block masks
``pconv``                 9 L + R w(I + 1) + K' (w(I) + w(L) + 4 b) for a library   PCONV masks
                          of L kernel patterns, I inputs per row, K' kept kernels
                          (per row its kernel count; per kernel its input channel,
                          pattern id and 4 values: PatDNN's FKW layout)
``kernel-bitmask``        R I + K' s b (one bit per kernel, then the kept          kernel masks
                          kernels' values) for I inputs per row, K' kept kernels
                          of s = kh x kw weights
``darb``                  K b + O + R w(|B|) for the layer's limits K (kept        DARB masks
                          weights) and O (offset bits) and |B| block sizes: per
                          row its block size, per kept weight its offset in its
                          block (ceil(log2 b_i) bits) and value; the file holds
                          the realized sizes, at most this
========================  ======================================================  ===========

Break-even densities follow: the bitmask beats dense below density 1 - 1/b (0.97 at float32,
0.875 at 8 bits); CSR beats the bitmask only at high sparsity. PyTorch's own COO and CSR
layouts (int64 indices) are not offered: at the 50-90 % sparsity CNNs reach they are larger
than the dense tensor (``docs/source/sparse.rst``), so a report in them would overstate the
size. Quantization scales, biases and batch-norm parameters are costed by the ``bytes`` metric
beside the weight (:mod:`automlprune.cost.metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from automlprune.quantization import pack_codes, unpack_codes
from automlprune.registry import Registry


def index_bits(values: int) -> int:
    """w(n): bits of an unsigned index taking ``values`` distinct values (at least 1)."""
    return max(1, math.ceil(math.log2(max(values, 1))))


@dataclass(frozen=True)
class Layout:
    """What a format's size depends on: ``rows`` x ``columns`` weights, ``kept`` of them, at
    ``bits`` bits each; ``run``: M of an N:M mask; ``block``: (r, c) and ``blocks``: kept blocks of
    a block mask; ``library``: the kernel-pattern library size of a PCONV mask and ``kernels``
    its kept 3 x 3 kernels (also the kept kernels of a ``kernel`` mask, whose kernels hold
    ``kernel_size`` weights); ``largest_block``: a DARB mask's largest block and ``offsets`` its
    offset-bit limit (None / 0 when the mask is not of that kind). For DARB ``kept`` is a limit the
    mask stays within."""

    rows: int
    columns: int
    kept: int
    bits: int
    run: Optional[int] = None
    block: Optional[tuple[int, int]] = None
    blocks: int = 0
    library: Optional[int] = None
    kernels: int = 0
    largest_block: Optional[int] = None
    offsets: int = 0
    kernel_size: Optional[int] = None

    @property
    def weights(self) -> int:
        return self.rows * self.columns


@dataclass(frozen=True)
class Format:
    """``size``: bits of a layout in this format; ``admits``: whether a mask of that layout can
    be stored in it; ``pack``: (mask, unsigned values, layout) -> named uint8 arrays; ``unpack``:
    (arrays, layout) -> (mask, values), both (rows, columns), values 0 where nothing is kept;
    ``structured``: a format for one pattern's masks (N:M, blocks), preferred on a tie (a 2:4
    mask costs the same as a bitmask and an N:M index, and is what sparse kernels read)."""

    name: str
    size: Callable[[Layout], int]
    admits: Callable[[Layout], bool]
    pack: Callable[[np.ndarray, np.ndarray, Layout], dict[str, np.ndarray]]
    unpack: Callable[[dict[str, np.ndarray], Layout], tuple[np.ndarray, np.ndarray]]
    structured: bool = False


FORMATS: Registry[Format] = Registry("storage format")


def register(fmt: Format, description: str) -> Format:
    """Add ``fmt`` to :data:`FORMATS`; ``description`` says what it stores (``automlprune list formats``)."""
    FORMATS.register(fmt.name, fmt, description=description)
    return fmt


def _always(layout: Layout) -> bool:
    return True


def _packed(values: np.ndarray, bits: int) -> np.ndarray:
    return pack_codes(np.asarray(values, dtype=np.uint64).reshape(-1), bits)


def _read(array: np.ndarray, bits: int, count: int) -> np.ndarray:
    return unpack_codes(array, bits, count) if count else np.zeros(0, dtype=np.int64)


# ---- dense ------------------------------------------------------------------------------------
def _dense_pack(mask, values, layout):
    return {"values": _packed(np.where(mask, values, 0), layout.bits)}


def _dense_unpack(arrays, layout):
    values = _read(arrays["values"], layout.bits, layout.weights).reshape(layout.rows, layout.columns)
    return np.ones_like(values, dtype=bool), values


register(Format("dense", lambda l: l.weights * l.bits, _always, _dense_pack, _dense_unpack), "every weight at its bits: N b")


# ---- bitmask ----------------------------------------------------------------------------------
def _bitmask_pack(mask, values, layout):
    return {"mask": np.packbits(mask.reshape(-1), bitorder="little"), "values": _packed(values[mask], layout.bits)}


def _bitmask_unpack(arrays, layout):
    mask = np.unpackbits(arrays["mask"], bitorder="little")[: layout.weights].astype(bool).reshape(layout.rows, layout.columns)
    values = np.zeros(mask.shape, dtype=np.int64)
    values[mask] = _read(arrays["values"], layout.bits, int(mask.sum()))
    return mask, values


register(Format("bitmask", lambda l: l.weights + l.kept * l.bits, _always, _bitmask_pack, _bitmask_unpack),
         "one bit per weight, then the kept values: N + k b")


# ---- csr --------------------------------------------------------------------------------------
def _csr_size(l: Layout) -> int:
    return (l.rows + 1) * index_bits(l.kept + 1) + l.kept * (index_bits(l.columns) + l.bits)


def _csr_pack(mask, values, layout):
    pointers = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
    _, columns = np.nonzero(mask)
    return {"pointers": _packed(pointers, index_bits(layout.kept + 1)), "columns": _packed(columns, index_bits(layout.columns)),
            "values": _packed(values[mask], layout.bits)}


def _csr_unpack(arrays, layout):
    pointers = _read(arrays["pointers"], index_bits(layout.kept + 1), layout.rows + 1)
    kept = int(pointers[-1])
    columns = _read(arrays["columns"], index_bits(layout.columns), kept)
    rows = np.repeat(np.arange(layout.rows), np.diff(pointers))
    mask = np.zeros((layout.rows, layout.columns), dtype=bool)
    mask[rows, columns] = True
    values = np.zeros(mask.shape, dtype=np.int64)
    values[rows, columns] = _read(arrays["values"], layout.bits, kept)
    return mask, values


register(Format("csr", _csr_size, _always, _csr_pack, _csr_unpack),
         "row pointers, column indices and values at minimal widths: (R + 1) w(k + 1) + k (w(C) + b)")


# ---- n:m --------------------------------------------------------------------------------------
def _nm_pack(mask, values, layout):
    m = layout.run
    runs = mask.reshape(layout.rows, -1, m)
    positions = np.nonzero(runs)[2]  # row-major: each run's kept positions in order
    return {"positions": _packed(positions, index_bits(m)), "values": _packed(values[mask], layout.bits)}


def _nm_unpack(arrays, layout):
    m, kept = layout.run, layout.kept
    per_run = kept // (layout.weights // m)
    positions = _read(arrays["positions"], index_bits(m), kept)
    runs = np.repeat(np.arange(layout.weights // m), per_run)
    flat = runs * m + positions
    mask = np.zeros(layout.weights, dtype=bool)
    mask[flat] = True
    values = np.zeros(layout.weights, dtype=np.int64)
    values[flat] = _read(arrays["values"], layout.bits, kept)
    return mask.reshape(layout.rows, layout.columns), values.reshape(layout.rows, layout.columns)


register(Format("n:m", lambda l: l.kept * (index_bits(l.run) + l.bits), lambda l: l.run is not None, _nm_pack, _nm_unpack, True),
         "each kept value with its position in its run of M (N:M masks): k (w(M) + b)")


# ---- block formats ----------------------------------------------------------------------------
def _tiles(array: np.ndarray, layout: Layout) -> np.ndarray:
    """(rows, columns) -> (block rows, block columns, r, c)."""
    r, c = layout.block
    return array.reshape(layout.rows // r, r, layout.columns // c, c).transpose(0, 2, 1, 3)


def _untile(tiles: np.ndarray, layout: Layout) -> np.ndarray:
    return tiles.transpose(0, 2, 1, 3).reshape(layout.rows, layout.columns)


def _block_values(values, layout, kept_tiles):
    return _packed(_tiles(values, layout)[kept_tiles].reshape(-1), layout.bits)


def _block_fill(kept_tiles, packed_values, layout):
    r, c = layout.block
    tiles = np.zeros(kept_tiles.shape + (r, c), dtype=np.int64)
    tiles[kept_tiles] = _read(packed_values, layout.bits, int(kept_tiles.sum()) * r * c).reshape(-1, r, c)
    mask = np.broadcast_to(kept_tiles[:, :, None, None], tiles.shape)
    return _untile(np.ascontiguousarray(mask), layout), _untile(tiles, layout)


def _bsr_size(l: Layout) -> int:
    r, c = l.block
    return (l.rows // r + 1) * index_bits(l.blocks + 1) + l.blocks * (index_bits(l.columns // c) + r * c * l.bits)


def _bsr_pack(mask, values, layout):
    kept_tiles = _tiles(mask, layout).all(axis=(2, 3))
    pointers = np.concatenate([[0], np.cumsum(kept_tiles.sum(axis=1))])
    return {"pointers": _packed(pointers, index_bits(layout.blocks + 1)),
            "columns": _packed(np.nonzero(kept_tiles)[1], index_bits(layout.columns // layout.block[1])),
            "values": _block_values(values, layout, kept_tiles)}


def _bsr_unpack(arrays, layout):
    r, c = layout.block
    block_rows, block_columns = layout.rows // r, layout.columns // c
    pointers = _read(arrays["pointers"], index_bits(layout.blocks + 1), block_rows + 1)
    columns = _read(arrays["columns"], index_bits(block_columns), int(pointers[-1]))
    kept_tiles = np.zeros((block_rows, block_columns), dtype=bool)
    kept_tiles[np.repeat(np.arange(block_rows), np.diff(pointers)), columns] = True
    return _block_fill(kept_tiles, arrays["values"], layout)


def _block_bitmask_pack(mask, values, layout):
    kept_tiles = _tiles(mask, layout).all(axis=(2, 3))
    return {"mask": np.packbits(kept_tiles.reshape(-1), bitorder="little"), "values": _block_values(values, layout, kept_tiles)}


def _block_bitmask_unpack(arrays, layout):
    r, c = layout.block
    shape = (layout.rows // r, layout.columns // c)
    kept_tiles = np.unpackbits(arrays["mask"], bitorder="little")[: shape[0] * shape[1]].astype(bool).reshape(shape)
    return _block_fill(kept_tiles, arrays["values"], layout)


def _is_block(layout: Layout) -> bool:
    return layout.block is not None


register(Format("bsr", _bsr_size, _is_block, _bsr_pack, _bsr_unpack, True),
         "block row pointers, block columns and the kept r x c blocks' values (block masks)")
register(Format("block-bitmask", lambda l: l.weights // (l.block[0] * l.block[1]) + l.blocks * l.block[0] * l.block[1] * l.bits,
                _is_block, _block_bitmask_pack, _block_bitmask_unpack, True),
         "one bit per r x c block, then the kept blocks' values (block masks)")


# ---- pconv (PCONV kernel patterns + connectivity) ------------------------------------------------
def _pconv_size(l: Layout) -> int:
    inputs = l.columns // 9
    return 9 * l.library + l.rows * index_bits(inputs + 1) + l.kernels * (index_bits(inputs) + index_bits(l.library) + 4 * l.bits)


def _kernel_view(array: np.ndarray, layout: Layout) -> np.ndarray:
    """(rows, columns) channels-last -> (rows, inputs, 9) per-kernel entries."""
    return array.reshape(layout.rows, 3, 3, -1).transpose(0, 3, 1, 2).reshape(layout.rows, -1, 9)


def _pconv_pack(mask, values, layout):
    kernels = _kernel_view(mask, layout)
    kept = kernels.any(axis=2)
    codes = (kernels.astype(np.int64) << np.arange(9)).sum(axis=2)
    used = sorted(set(codes[kept].tolist()))
    if len(used) > layout.library or any(bin(c).count("1") != 4 for c in used):
        raise ValueError(f"the mask is not a PCONV mask of {layout.library} 4-entry kernel patterns")
    library = used + [0] * (layout.library - len(used))
    rows, inputs = np.nonzero(kept)
    ids = np.searchsorted(np.array(used, dtype=np.int64), codes[rows, inputs])
    kernel_values = _kernel_view(values, layout)[rows, inputs]  # (K', 9)
    chosen = _kernel_view(mask, layout)[rows, inputs]
    return {"library": _packed(library, 9), "counts": _packed(kept.sum(axis=1), index_bits(kept.shape[1] + 1)),
            "inputs": _packed(inputs, index_bits(kept.shape[1])), "patterns": _packed(ids, index_bits(layout.library)),
            "values": _packed(kernel_values[chosen], layout.bits)}


def _pconv_unpack(arrays, layout):
    inputs = layout.columns // 9
    library = _read(arrays["library"], 9, layout.library)
    counts = _read(arrays["counts"], index_bits(inputs + 1), layout.rows)
    kept = int(counts.sum())
    columns = _read(arrays["inputs"], index_bits(inputs), kept)
    ids = _read(arrays["patterns"], index_bits(layout.library), kept)
    rows = np.repeat(np.arange(layout.rows), counts)
    shapes = ((library[ids][:, None] >> np.arange(9)) & 1).astype(bool)  # (K', 9)
    mask = np.zeros((layout.rows, inputs, 9), dtype=bool)
    mask[rows, columns] = shapes
    values = np.zeros((layout.rows, inputs, 9), dtype=np.int64)
    block = np.zeros((kept, 9), dtype=np.int64)
    block[shapes] = _read(arrays["values"], layout.bits, int(shapes.sum()))
    values[rows, columns] = block
    back = lambda a: a.reshape(layout.rows, inputs, 3, 3).transpose(0, 2, 3, 1).reshape(layout.rows, layout.columns)  # noqa: E731
    return back(mask), back(values)


register(Format("pconv", _pconv_size, lambda l: l.library is not None, _pconv_pack, _pconv_unpack, True),
         "PCONV: a library of 4-entry 3x3 kernel patterns, per row its kernel count, per kernel its input, pattern id and 4 values")


# ---- darb (density-adaptive regular blocks) --------------------------------------------------------
def _darb_sizes(layout: Layout) -> int:
    """How many block sizes a row may take (1, 2, 4, ... up to the layout's largest block)."""
    return layout.largest_block.bit_length()


def _darb_size(l: Layout) -> int:
    return l.kept * l.bits + l.offsets + l.rows * index_bits(_darb_sizes(l))


def _darb_pack(mask, values, layout):
    columns = layout.columns
    counts = mask.sum(axis=1)
    exponents = np.zeros(layout.rows, dtype=np.int64)
    offsets: dict[int, list[np.ndarray]] = {}
    for row in range(layout.rows):
        exponent = next((e for e in range(_darb_sizes(layout)) if -(-columns // (1 << e)) == counts[row]), None)
        kept = np.nonzero(mask[row])[0]
        size = 1 << (exponent or 0)
        if exponent is None or not np.array_equal(kept // size, np.arange(len(kept))):
            raise ValueError("the mask is not a DARB mask: every row keeps one weight in each of its blocks")
        exponents[row] = exponent
        if exponent:
            offsets.setdefault(exponent, []).append(kept % size)
    arrays = {"sizes": _packed(exponents, index_bits(_darb_sizes(layout)))}
    for exponent, parts in sorted(offsets.items()):
        arrays[f"offsets{exponent}"] = _packed(np.concatenate(parts), exponent)
    arrays["values"] = _packed(values[mask], layout.bits)
    return arrays


def _darb_unpack(arrays, layout):
    columns = layout.columns
    exponents = _read(arrays["sizes"], index_bits(_darb_sizes(layout)), layout.rows)
    counts = -(-columns // (1 << exponents))
    mask = np.zeros((layout.rows, columns), dtype=bool)
    for exponent in np.unique(exponents):
        rows = np.nonzero(exponents == exponent)[0]
        per_row = -(-columns // (1 << int(exponent)))
        offsets = (_read(arrays[f"offsets{exponent}"], int(exponent), len(rows) * per_row).reshape(len(rows), per_row)
                   if exponent else np.zeros((len(rows), per_row), dtype=np.int64))
        mask[rows[:, None], np.arange(per_row) * (1 << int(exponent)) + offsets] = True
    values = np.zeros(mask.shape, dtype=np.int64)
    values[mask] = _read(arrays["values"], layout.bits, int(counts.sum()))
    return mask, values


# ---- kernel (whole kernels: connectivity pruning) --------------------------------------------------
def _kernels_of(array: np.ndarray, layout: Layout) -> np.ndarray:
    """(rows, columns) channels-last -> (rows, inputs, kernel_size) per-kernel entries."""
    return array.reshape(layout.rows, layout.kernel_size, -1).transpose(0, 2, 1)


def _kernel_bitmask_pack(mask, values, layout):
    kept = _kernels_of(mask, layout).all(axis=2)
    return {"mask": np.packbits(kept.reshape(-1), bitorder="little"),
            "values": _packed(_kernels_of(values, layout)[kept].reshape(-1), layout.bits)}


def _kernel_bitmask_unpack(arrays, layout):
    inputs = layout.columns // layout.kernel_size
    kept = np.unpackbits(arrays["mask"], bitorder="little")[: layout.rows * inputs].astype(bool).reshape(layout.rows, inputs)
    kernels = np.zeros((layout.rows, inputs, layout.kernel_size), dtype=np.int64)
    kernels[kept] = _read(arrays["values"], layout.bits, int(kept.sum()) * layout.kernel_size).reshape(-1, layout.kernel_size)
    back = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(layout.rows, layout.columns)  # noqa: E731
    return back(np.broadcast_to(kept[:, :, None], kernels.shape)), back(kernels)


register(Format("kernel-bitmask", lambda l: l.weights // l.kernel_size + l.kernels * l.kernel_size * l.bits,
                lambda l: l.kernel_size is not None, _kernel_bitmask_pack, _kernel_bitmask_unpack, True),
         "one bit per kh x kw kernel, then the kept kernels' values (kernel masks): R I + K' s b")


register(Format("darb", _darb_size, lambda l: l.largest_block is not None, _darb_pack, _darb_unpack, True),
         "DARB: per row its block size, per kept weight its offset in its block and its value (at most the layer's limits)")


def layout_of(pattern: Any, geometry: Any, density: float, bits: int, mask: Optional[torch.Tensor] = None) -> Layout:
    """The :class:`Layout` of a layer of ``geometry`` (:class:`~automlprune.sparsity.patterns.Geometry`)
    sparsified with ``pattern`` at ``density``, its values at ``bits`` bits. For a pattern whose
    kept count is a limit (DARB), the layout holds the limits, or, given the layer's realized
    ``mask`` (the (rows, columns) pattern matrix), what that mask really keeps."""
    blocks = pattern.kept_blocks(geometry, density) if pattern.block else 0
    kernels = pattern.kept_kernels(geometry, density) if pattern.library or pattern.whole_kernels else 0
    darb = pattern.largest_block is not None
    if mask is not None and not pattern.exact_count:  # what the realized mask keeps
        kept, offsets = pattern.realized(torch.as_tensor(mask))
    else:  # the pattern's count, or its limits before the weights are known (DARB)
        kept, offsets = pattern.kept(geometry, density), pattern.offset_budget(geometry, density) if darb else 0
    return Layout(geometry.rows, geometry.columns, kept, int(bits), pattern.run, pattern.block, blocks,
                  pattern.library, kernels, pattern.largest_for(geometry.columns) if darb else None, offsets,
                  geometry.kernel if pattern.whole_kernels else None)


def smallest(layout: Layout, sparse: bool = True) -> tuple[str, int]:
    """(format name, bits) of the smallest format admitting ``layout`` (on a tie a structured
    format, then the first registered); a dense layer (``sparse`` False) is always stored dense."""
    if not sparse:
        return "dense", FORMATS.get("dense").size(layout)
    sizes = [(FORMATS.get(n).size(layout), not FORMATS.get(n).structured, i, n)
             for i, n in enumerate(FORMATS.ordered_names()) if FORMATS.get(n).admits(layout)]
    bits, _, _, name = min(sizes)
    return name, bits


def float_bits(tensor: torch.Tensor) -> np.ndarray:
    """A float32 tensor's IEEE bit patterns as unsigned integers (the 32-bit "codes" of an
    unquantized weight)."""
    return tensor.detach().float().cpu().contiguous().numpy().view(np.uint32).astype(np.uint64)


def from_float_bits(codes: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`float_bits`."""
    return torch.from_numpy(np.ascontiguousarray(codes.astype(np.uint32)).view(np.float32).copy())
