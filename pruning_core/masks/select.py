"""Vectorized keep-mask selection: exact top-k per comparison group and N:M groups.

Stage: masks (low level). Every function takes importance scores (higher = more important) and
returns a bool tensor shaped like the scores, ``True`` = keep. The ``generate_*`` functions in
:mod:`pruning_core.masks.generate` wrap these in validated :class:`SparsityMask` objects. The
structured variants (:func:`keep_blocks`, :func:`keep_rows`, :func:`keep_columns`) rank whole
groups by a reduced group score (:func:`group_scores`).

Exactness: a comparison group of ``L`` scores loses exactly ``k = floor(L * s)`` elements
(:func:`pruning_core.validate.num_to_prune`), and every kept score is >= every pruned score of
its group.

Tie rule (everywhere): among equal scores the LOWER index is kept, exactly ``L - k`` are kept,
so the result is deterministic and identical to a stable descending sort (the N:M reference
behaviour). (How this differs from the seed: :mod:`pruning_core.compat`.)

Non-finite scores (NaN, +-Inf) raise :class:`~pruning_core.errors.NumericalInstability` naming
the layer: NaN has no rank, and an Inf score would make "keep the largest" meaningless.
"""

from __future__ import annotations

import math

import torch

from pruning_core.errors import ConfigError, InvalidPattern, ShapeMismatch
from pruning_core.masks.pattern import NM, Block
from pruning_core.validate import check_finite, check_rank, check_sparsity, num_to_prune

# Flat groups at least this large find their threshold from a random sample (see _kth_sampled);
# smaller ones (and per-row groups, which torch.kthvalue parallelizes over rows) use kthvalue.
_SAMPLED_MIN = 1 << 20
_SAMPLE_SIZE = 1 << 16
# Up to this M, N:M ranks come from M*(M-1)/2 column comparisons; above it, a stable sort.
_PAIRWISE_MAX_M = 8


def prepare_scores(scores: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """Return ``scores`` as a float32/float64 tensor after rejecting non-finite values.

    Half-precision and integer scores are upcast to float32 (exactly); float32/float64 pass
    through without a copy.

    Raises:
        TypeError: ``scores`` is not a tensor.
        NumericalInstability: a score is NaN or +-Inf (names the layer and the first index).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.is_complex():
        raise TypeError(f"scores must be real, got {scores.dtype}")
    x = scores if scores.dtype in (torch.float32, torch.float64) else scores.to(torch.float32)
    # A sum is finite only if every term is (NaN and Inf propagate), so one cheap reduction
    # clears the common case; only a non-finite sum (or an overflow) pays for the full scan.
    if x.numel() and not bool(torch.isfinite(x.sum())):
        check_finite(x, method="mask selection", what="scores", layer=name)
    return x


def keep_topk(
    scores: torch.Tensor, sparsity: float, *, dim: int | None = None, name: str | None = None
) -> torch.Tensor:
    """Keep all but the ``k = floor(L * sparsity)`` lowest scores of each comparison group.

    Args:
        scores: any shape; higher means more important.
        sparsity: fraction to prune, in [0, 1] (1.0 prunes everything).
        dim: ``None``: the whole tensor is one group (L = numel). ``-1`` (or the last dim's
            index): every row along the last dim is a group (Wanda's per-output-row groups for
            an ``[out, in]`` score matrix).
        name: layer name for error messages.

    Returns:
        bool tensor shaped like ``scores``; exactly ``L - k`` True per group, ties kept at the
        lower index.
    """
    s = check_sparsity(sparsity, name=name)
    if dim is not None and dim not in (-1, scores.dim() - 1):
        raise ConfigError("dim", f"must be None or -1 (the last dimension), got {dim}")
    x = prepare_scores(scores, name=name)
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    rows = x.reshape(1, -1) if dim is None or x.dim() <= 1 else x.reshape(-1, x.shape[-1])
    keep = _keep_rows(rows, num_to_prune(rows.shape[1], s))
    return keep.reshape(x.shape)


def keep_largest(scores: torch.Tensor, k: int, *, name: str | None = None) -> torch.Tensor:
    """Keep exactly the ``k`` largest scores of the whole tensor (ties: the lower flat index).

    The count form of :func:`keep_topk`, for callers that compute survivor counts themselves
    (Lottery Ticket rounds: ``round(n * (1 - p)^r)``).
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= scores.numel():
        raise ConfigError("k", f"must be an int in [0, {scores.numel()}], got {k!r}")
    x = prepare_scores(scores, name=name)
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    return _keep_rows(x.reshape(1, -1), x.numel() - k).reshape(x.shape)


def _keep_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``rows`` [G, L], keep all but the k smallest (ties: lower index kept)."""
    num_groups, length = rows.shape
    if k == 0:
        return torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    if k == length:
        return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    if num_groups == 1 and length >= _SAMPLED_MIN:
        threshold = _kth_sampled(rows[0], k).reshape(1, 1)
    else:
        threshold = torch.kthvalue(rows, k, dim=1, keepdim=True).values  # [G, 1]
    keep = rows > threshold  # [G, L]
    # At most L - k scores per row exceed the k-th smallest, so the total only reaches
    # G * (L - k) when no row has ties to resolve: one cheap count instead of a per-row one.
    if int(torch.count_nonzero(keep)) < num_groups * (length - k):
        _keep_first_ties(rows, threshold, keep, length - k)
    return keep


def _keep_first_ties(rows: torch.Tensor, threshold: torch.Tensor, keep: torch.Tensor, n_keep: int) -> None:
    """Fill each row of ``keep`` up to ``n_keep`` with its lowest-index scores equal to the threshold."""
    deficit = n_keep - keep.sum(dim=1)  # [G] ties still to keep per row
    r, c = torch.nonzero(rows == threshold, as_tuple=True)  # row-major: each row's ties in index order
    counts = torch.bincount(r, minlength=rows.shape[0])
    first = torch.cumsum(counts, 0) - counts  # position of each row's first tie in (r, c)
    rank = torch.arange(r.numel(), device=rows.device) - first[r]  # rank of the tie within its row
    take = rank < deficit[r]
    keep[r[take], c[take]] = True


def _kth_sampled(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of the 1-D tensor ``x``, exactly, in a few linear passes.

    A random sample brackets the answer in ``[lo, hi]`` (about 5 standard deviations of the
    sample rank on each side, ~2% of ``x``); only the scores inside the bracket go through
    ``torch.kthvalue``. If the bracket misses (probability ~1e-6, or adversarial ties) it falls
    back to ``torch.kthvalue`` on all of ``x``, so the result never depends on the sample
    (Floyd & Rivest 1975, "Expected time bounds for selection").
    """
    n = x.numel()
    gen = torch.Generator().manual_seed(0)  # local generator: no global RNG state is touched
    idx = torch.randint(n, (_SAMPLE_SIZE,), generator=gen).to(x.device)
    sample = torch.sort(x[idx]).values
    center = k / n * _SAMPLE_SIZE
    margin = 5.0 * math.sqrt(_SAMPLE_SIZE * (k / n) * (1 - k / n)) + 2.0
    lo_i, hi_i = math.floor(center - margin), math.ceil(center + margin)
    lo = sample[lo_i] if lo_i >= 0 else x.new_tensor(-math.inf)
    hi = sample[hi_i] if hi_i < _SAMPLE_SIZE else x.new_tensor(math.inf)
    in_bracket = x >= lo
    below = n - int(torch.count_nonzero(in_bracket))  # scores < lo
    in_bracket &= x <= hi
    count = int(torch.count_nonzero(in_bracket))
    if not below < k <= below + count:
        return torch.kthvalue(x, k).values
    if bool(lo == hi):  # every score in the bracket equals lo (massive ties, e.g. zeros)
        return lo
    if count > n // 8:  # a bracket this wide costs more than it saves
        return torch.kthvalue(x, k).values
    candidates = x[torch.nonzero(in_bracket, as_tuple=True)[0]]
    return torch.kthvalue(candidates, k - below).values


def keep_nm(scores: torch.Tensor, n: int, m: int, *, name: str | None = None) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along the last (input) dim.

    Groups never cross rows: the last dimension must be divisible by ``m``. Ties keep the lower
    index (the stable-sort rule of the Wanda/SparseGPT reference code).

    Args:
        scores: shape ``[..., in]`` with ``in % m == 0`` (``[out, in]`` for an nn.Linear).
        n: kept per group, ``0 <= n <= m``.
        m: group size, ``m > 0``.

    Raises:
        InvalidPattern: malformed N:M, or a last dimension not divisible by ``m``.
    """
    pattern = NM(n, m)
    pattern.check()
    x = prepare_scores(scores, name=name)
    if x.dim() == 0:
        raise ShapeMismatch("at least 1-D scores", [], name=name, reason="N:M needs a last dimension")
    width = x.shape[-1]
    if width % m:
        raise InvalidPattern(
            f"last dimension {width} of shape {list(x.shape)} is not divisible by M={m} (N:M = {n}:{m})",
            name=name,
        )
    if n == m or x.numel() == 0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if n == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    groups = x.reshape(-1, m)  # [G, m]
    keep = _nm_pairwise(groups, n) if m <= _PAIRWISE_MAX_M else _nm_sorted(groups, n)
    return keep.reshape(x.shape)


def _nm_pairwise(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Keep iff rank < n, rank_i = #{j: s_j > s_i or (s_j == s_i and j < i)}; [G, m] -> [G, m].

    With ``c_ij = s_j > s_i`` for i < j (j beats i; at equal scores the lower index i wins):
    ``rank_j = j - sum_{i<j} c_ij + sum_{k>j} c_jk``. That is M*(M-1)/2 whole-column
    comparisons and two in-place uint8 updates each - no loop over groups.
    """
    num_groups, m = groups.shape
    cols = groups.unbind(dim=1)  # m strided views of shape [G]
    rank = [torch.full((num_groups,), j, dtype=torch.uint8, device=groups.device) for j in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            j_wins = torch.gt(cols[j], cols[i]).view(torch.uint8)  # bool -> 0/1 bytes, no copy
            rank[i] += j_wins
            rank[j] -= j_wins
    keep = torch.empty(groups.shape, dtype=torch.bool, device=groups.device)
    for j in range(m):
        torch.lt(rank[j], n, out=keep[:, j])
    return keep


def _nm_sorted(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Stable descending sort per group (equal scores keep index order); [G, m] -> [G, m]."""
    top = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    return keep.scatter_(1, top, True)


REDUCTIONS = ("sum", "max", "l2")


def group_scores(x: torch.Tensor, dims: tuple[int, ...], reduce: str) -> torch.Tensor:
    """Reduce element scores over ``dims`` into group scores, in float64.

    ``"sum"``: the sum of the scores. ``"max"``: max |score| (the L-inf
    norm). ``"l2"``: sqrt(sum score^2) (the L2 norm). Float64 accumulation cannot overflow for
    float32 inputs.
    """
    if reduce not in REDUCTIONS:
        raise ConfigError("reduce", f"must be one of {', '.join(REDUCTIONS)}; got {reduce!r}")
    if reduce == "sum" or x.numel() == 0:  # (amax cannot reduce an empty tensor)
        return x.sum(dim=dims, dtype=torch.float64)
    if reduce == "max":
        return x.abs().amax(dim=dims).to(torch.float64)
    return torch.linalg.vector_norm(x, 2, dim=dims, dtype=torch.float64)


def _scores_2d(scores: torch.Tensor, what: str, name: str | None) -> torch.Tensor:
    if isinstance(scores, torch.Tensor):
        check_rank(scores, 2, name=name, what=f"score tensor ({what} masks need [rows, cols])")
    return prepare_scores(scores, name=name)


def keep_rows(
    scores: torch.Tensor, sparsity: float, *, reduce: str = "sum", name: str | None = None
) -> torch.Tensor:
    """Keep whole rows (output neurons) of ``scores`` [rows, cols]; floor(rows * s) rows pruned.

    Rows are ranked by :func:`group_scores` over the row; ties keep the lower row index.
    """
    s = check_sparsity(sparsity, name=name)
    x = _scores_2d(scores, "Row", name)
    keep = keep_topk(group_scores(x, (1,), reduce), s, name=name)  # [rows]
    return keep[:, None].expand(x.shape).contiguous()


def keep_columns(
    scores: torch.Tensor, sparsity: float, *, reduce: str = "sum", name: str | None = None
) -> torch.Tensor:
    """Keep whole columns (input features) of ``scores`` [rows, cols]; floor(cols * s) pruned.

    Columns are ranked by :func:`group_scores` over the column; ties keep the lower column index.
    """
    s = check_sparsity(sparsity, name=name)
    x = _scores_2d(scores, "Column", name)
    keep = keep_topk(group_scores(x, (0,), reduce), s, name=name)  # [cols]
    return keep[None, :].expand(x.shape).contiguous()


def keep_blocks(
    scores: torch.Tensor,
    height: int,
    width: int,
    sparsity: float,
    *,
    reduce: str = "sum",
    name: str | None = None,
) -> torch.Tensor:
    """Keep whole ``height x width`` tiles of ``scores`` [rows, cols]; floor(n_blocks * s) pruned.

    Tiles are ranked by :func:`group_scores`; ties keep the lower block index in block-row-major
    order. ``rows`` and ``cols`` must be divisible by the block.

    Raises:
        InvalidPattern: a zero block size, or a shape not divisible by the block.
        ShapeMismatch: scores that are not 2-D.
    """
    Block(height, width).check()
    s = check_sparsity(sparsity, name=name)
    x = _scores_2d(scores, "Block", name)
    rows, cols = x.shape
    if rows % height or cols % width:
        raise InvalidPattern(f"shape {rows}x{cols} is not divisible by the {height}x{width} block", name=name)
    tiles = x.reshape(rows // height, height, cols // width, width)
    keep = keep_topk(group_scores(tiles, (1, 3), reduce), s, name=name)  # [rows/h, cols/w]
    return keep[:, None, :, None].expand(tiles.shape).reshape(rows, cols)


__all__ = [
    "REDUCTIONS",
    "group_scores",
    "keep_blocks",
    "keep_columns",
    "keep_largest",
    "keep_nm",
    "keep_rows",
    "keep_topk",
    "prepare_scores",
]
