"""``Σ a aᵀ`` over the image patches of a stride-1 convolution, from shifted copies of its input (no patches).

With kernel offsets ``u = (u_1, u_2)`` and ``X`` the padded input, the patch rows of a stride-1, undilated
``Conv2D`` are ``a_{i,j} = (X[i + u_1, j + u_2])_u`` at the output positions ``(i, j)`` (``H_o × W_o`` of them), so
the (u, v) block of ``Σ a aᵀ`` is

    ``Σ_{i < H_o, j < W_o} X[(i, j) + u] X[(i, j) + v]ᵀ``  (C × C).

Two pairs of offsets with the same difference ``D = v - u`` sum the same products ``X[q] X[q + D]ᵀ`` over windows
that differ only by a few rows and columns at the edges. So the sums over the widest windows of every difference D
(``(2 k_h - 1)(2 k_w - 1)`` of them, all at once as the filter gradient of a convolution of X with itself) and the
sums of the windows' edge rows, edge columns and corners give every block by inclusion and exclusion (half of them:
``A_{vu} = A_{uv}ᵀ``), without materialising the patches. Measured on CPU against the
``(B·T, k_h k_w C)ᵀ (B·T, k_h k_w C)`` product of the patches (batch 128, 3 × 3 kernels): about 2 times faster on
32 × 32 × 32 inputs, 1.6 times on 16 × 16 × 64, as fast on 8 × 8 × 96.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf


def _edge_positions(extra: int, inner: int) -> List[int]:
    """Positions of the edge bands of a widest window of ``inner + extra`` positions: the first ``extra`` and the
    last ``extra`` (those not in every window)."""
    return list(range(extra)) + list(range(inner, inner + extra))


def _excluded(extra: int, shift: int) -> np.ndarray:
    """Mask over :func:`_edge_positions` of the positions outside the window shifted by ``shift`` (0 ≤ shift ≤
    extra): the first ``shift`` ones of the leading band and the last ``extra - shift`` of the trailing band."""
    return np.array([position < shift for position in range(extra)]
                    + [position >= shift for position in range(extra)], np.float64)


def _band(padded: tf.Tensor, start: Sequence[int], size: Sequence[int], rows: Optional[List[int]],
          columns: Optional[List[int]]) -> tf.Tensor:
    """Rows and/or columns (positions within the window) of the window of ``padded`` at ``start`` of ``size``."""
    band = padded
    if rows is not None:
        band = tf.gather(band, [start[0] + row for row in rows], axis=1)
    else:
        band = band[:, start[0]:start[0] + size[0]]
    if columns is not None:
        return tf.gather(band, [start[1] + column for column in columns], axis=2)
    return band[:, :, start[1]:start[1] + size[1]]


def _difference_blocks(padded: tf.Tensor, total: tf.Tensor, difference: Tuple[int, int], kernel: Sequence[int],
                       outputs: Sequence[int]) -> Dict[Tuple[int, int], tf.Tensor]:
    """The blocks ``{(shift_1, shift_2): Σ X[q + u_ref + shift] X[q + v_ref + shift]ᵀ}`` of one difference, from
    ``total``, the sum over the widest window (every q with both pixels in the padded image)."""
    left_start = [max(0, -d) for d in difference]
    right_start = [start + d for start, d in zip(left_start, difference)]
    extra = [k - 1 - abs(d) for k, d in zip(kernel, difference)]
    size = [count + more for count, more in zip(outputs, extra)]
    rows, columns = _edge_positions(extra[0], outputs[0]), _edge_positions(extra[1], outputs[1])
    row_sums = column_sums = corners = None
    if rows:
        row_sums = tf.einsum("brwx,brwy->rxy", _band(padded, left_start, size, rows, None),
                             _band(padded, right_start, size, rows, None))
    if columns:
        column_sums = tf.einsum("bhcx,bhcy->cxy", _band(padded, left_start, size, None, columns),
                                _band(padded, right_start, size, None, columns))
    if rows and columns:
        corners = tf.einsum("brcx,brcy->rcxy", _band(padded, left_start, size, rows, columns),
                            _band(padded, right_start, size, rows, columns))
    blocks = {}
    for shift_rows in range(extra[0] + 1):
        for shift_columns in range(extra[1] + 1):
            block = total
            row_mask, column_mask = _excluded(extra[0], shift_rows), _excluded(extra[1], shift_columns)
            if row_sums is not None:
                block -= tf.tensordot(tf.constant(row_mask, block.dtype), row_sums, 1)
            if column_sums is not None:
                block -= tf.tensordot(tf.constant(column_mask, block.dtype), column_sums, 1)
            if corners is not None:
                block += tf.tensordot(tf.constant(np.outer(row_mask, column_mask), block.dtype), corners, 2)
            blocks[(shift_rows, shift_columns)] = block
    return blocks


def _difference_totals(padded: tf.Tensor, kernel: Sequence[int]) -> tf.Tensor:
    """``F[D + k - 1] = Σ_q X[q + D] X[q]ᵀ`` for every difference D of two kernel offsets, (2 k_h - 1, 2 k_w - 1,
    C, C), as the filter gradient of a convolution of X (zero-padded) whose output gradient is X itself: one
    optimised operation instead of one product per difference."""
    channels = int(padded.shape[-1])
    wider = tf.pad(padded, [[0, 0], [kernel[0] - 1, kernel[0] - 1], [kernel[1] - 1, kernel[1] - 1], [0, 0]])
    return tf.raw_ops.Conv2DBackpropFilter(input=wider, filter_sizes=[2 * kernel[0] - 1, 2 * kernel[1] - 1,
                                                                      channels, channels],
                                           out_backprop=padded, strides=[1, 1, 1, 1], padding="VALID")


def stride_one_patch_moments(inputs: tf.Tensor, kernel: Sequence[int], padding: str,
                             dtype: tf.DType) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(Σ a aᵀ, Σ a)`` over the samples and output positions of a stride-1, undilated, channels-last ``Conv2D``.

    Parameters
    ----------
    inputs
        The layer's input (B, H, W, C), H, W and C known statically.
    kernel
        ``(k_h, k_w)``.
    padding
        ``"same"`` or ``"valid"`` (Keras' names).
    dtype
        Of the computation and of the results.

    Returns
    -------
    tuple
        ``(k_h k_w C, k_h k_w C)`` and ``(k_h k_w C,)``, rows ordered as the flattened (k_h, k_w, C) patches.
    """
    kernel = [int(size) for size in kernel]
    values = tf.cast(inputs, dtype)
    if padding == "same":
        values = tf.pad(values, [[0, 0]] + [[(k - 1) // 2, k - 1 - (k - 1) // 2] for k in kernel] + [[0, 0]])
    outputs = [int(size) - k + 1 for size, k in zip(values.shape[1:3], kernel)]
    offsets = [(row, column) for row in range(kernel[0]) for column in range(kernel[1])]
    totals = _difference_totals(values, kernel)
    grid: Dict[Tuple[int, int], tf.Tensor] = {}
    for difference_rows in range(0, kernel[0]):
        for difference_columns in range(-kernel[1] + 1, kernel[1]):
            if difference_rows == 0 and difference_columns < 0:
                continue  # the transposes of the blocks of the opposite difference
            difference = (difference_rows, difference_columns)
            total = tf.transpose(totals[difference[0] + kernel[0] - 1, difference[1] + kernel[1] - 1])
            for shift, block in _difference_blocks(values, total, difference, kernel, outputs).items():
                first = tuple(max(0, -d) + s for d, s in zip(difference, shift))
                second = tuple(f + d for f, d in zip(first, difference))
                grid[(first, second)] = block
                grid[(second, first)] = tf.transpose(block)
    moments = tf.concat([tf.concat([grid[(first, second)] for second in offsets], axis=1) for first in offsets],
                        axis=0)
    summed = tf.reduce_sum(values, axis=0)
    sums = tf.concat([tf.reduce_sum(summed[row:row + outputs[0], column:column + outputs[1]], axis=[0, 1])
                      for row, column in offsets], axis=0)
    return moments, sums
