"""A faithful transcription of the authors' SparseGPT reference, for comparisons only.

Source: IST-DASLab/sparsegpt @ 147d215, ``sparsegpt.py``: ``SparseGPT.add_batch`` and
``SparseGPT.fasterprune``, as functions of tensors. Removed: the quantizer, DEBUG prints,
``torch.cuda.synchronize()``, timing and the loss bookkeeping (they do not change the weights).
Kept as is: the ``tmp <= thresh`` threshold (prunes ``int(numel*s) + 1`` or more per block) and
``torch.topk`` for N:M (``prunen`` = number *pruned* per group of ``prunem``).
"""

from __future__ import annotations

import math

import torch


def reference_hessian(batches: list[torch.Tensor]) -> torch.Tensor:
    """``add_batch`` for an nn.Linear over ``[B, T, D]`` batches: H = 2/nsamples * sum x x^T."""
    columns = batches[0].shape[-1]
    H = torch.zeros((columns, columns))
    nsamples = 0
    for inp in batches:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        H *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = math.sqrt(2 / nsamples) * inp.float()
        H += inp.matmul(inp.t())
    return H


def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """``fasterprune`` on a weight ``W [rows, columns]`` and Hessian ``H``; returns the new weight."""
    W = W.clone().float()
    H = H.clone()
    rows, columns = W.shape
    dev = W.device

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=dev)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    mask = None

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if prunen == 0:
            if mask is not None:
                mask1 = mask[:, i1:i2]
            else:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)

            q = w.clone()
            q[mask1[:, i]] = 0

            Q1[:, i] = q

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1

        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return W
