"""Distillation windows that share no token with the windows candidates are scored on.

Stage: data for scoring candidates. With distillation on, each candidate is trained briefly
and then scored by its LM loss; if it was trained on the scoring windows, its loss is in-sample
(it measures memorisation, and favours candidates that memorise). Calibration windows start at
random positions, so two different windows can still share tokens; :func:`disjoint_windows`
draws windows none of whose token positions lie inside a scoring window.
"""

from __future__ import annotations

import torch

from pruning_core.errors import ConfigError


def window_positions(tokens: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Every start ``s`` with ``tokens[s : s + len(window)] == window`` (ascending ``[m]``).

    Args:
        tokens: ``[N]`` token ids of the text.
        window: ``[T]`` token ids.
    """
    length = window.numel()
    if length < 1 or length > tokens.numel():
        return torch.zeros(0, dtype=torch.long)
    probe = min(length, 4)  # match a short prefix everywhere, then check the full window there
    starts = (tokens[: tokens.numel() - length + probe].unfold(0, probe, 1) == window[:probe]).all(dim=1)
    starts = starts.nonzero().flatten()
    return torch.tensor([int(s) for s in starts if torch.equal(tokens[s : s + length], window)], dtype=torch.long)


def disjoint_windows(tokens: torch.Tensor, n: int, length: int, seed: int, avoid: torch.Tensor) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at seeded random starts, none overlapping ``avoid``.

    A start ``s`` is allowed if ``[s, s + length)`` shares no position with any occurrence in
    ``tokens`` of any row of ``avoid`` (every occurrence, so repeated text is avoided too).
    Starts are distinct, drawn uniformly from the allowed ones by ``torch.randperm`` with a
    ``torch.Generator().manual_seed(seed)``.

    Args:
        tokens: ``[N]`` token ids.
        avoid: ``[m, T]`` windows (e.g. the scoring windows), each taken from ``tokens``.

    Returns:
        ``[n, length]`` LongTensor.

    Raises:
        ConfigError: a row of ``avoid`` does not occur in ``tokens``, or fewer than ``n``
            allowed starts remain.
    """
    if n < 1 or length < 2 or tokens.numel() < length:
        raise ConfigError("distillation.windows", f"need n >= 1 and 2 <= length <= {tokens.numel()}; got {n}, {length}")
    allowed = torch.ones(tokens.numel() - length + 1, dtype=torch.bool)  # [N - length + 1]
    for row in avoid:
        found = window_positions(tokens, row)
        if found.numel() == 0:
            raise ConfigError("distillation.windows", "a window to avoid does not occur in the text")
        for a in found.tolist():  # windows starting in (a - length, a + T) overlap [a, a + T)
            allowed[max(0, a - length + 1) : a + row.numel()] = False
    starts = allowed.nonzero().flatten()
    if starts.numel() < n:
        raise ConfigError("distillation.windows", f"only {starts.numel()} start positions share no token with the "
                          f"scoring windows; {n} distillation windows of {length} tokens asked")
    pick = starts[torch.randperm(starts.numel(), generator=torch.Generator().manual_seed(int(seed)))[:n]]
    return tokens[pick[:, None] + torch.arange(length)]  # [n, length]


__all__ = ["disjoint_windows", "window_positions"]
