"""A faithful transcription of the authors' GPTQ and joint SparseGPT+quantization code, for comparisons.

Sources: IST-DASLab/gptq @ 2d65066 ``quant.py`` (``quantize``, ``Quantizer.find_params`` for
weights, ``perchannel=True``, ``mse=False``) and ``gptq.py`` (``GPTQ.fasterquant``, without
act-order and static groups); IST-DASLab/sparsegpt @ 147d215 ``sparsegpt.py`` (``fasterprune``
with its ``quantizer`` branch). Removed: DEBUG, timing, losses, ``torch.cuda.synchronize()``, the
layer object. One change: the references compute in float32 (``W.float()``); here the dtype is a
parameter, so that a float64 comparison is not at the mercy of float32 round-off deciding a
rounding tie differently.
"""

from __future__ import annotations

import torch


def quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


class Quantizer:
    """``quant.Quantizer`` configured with ``perchannel=True, mse=False`` and used for weights."""

    def __init__(self, bits, sym):
        self.maxq = torch.tensor(2 ** bits - 1)
        self.sym = sym

    def find_params(self, x):
        dev = x.device
        self.maxq = self.maxq.to(dev)
        shape = x.shape
        x = x.flatten(1)
        tmp = torch.zeros(x.shape[0], device=dev, dtype=x.dtype)
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            tmp = xmin < 0
            if torch.any(tmp):
                xmin[tmp] = -xmax[tmp]
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1
        self.scale = (xmax - xmin) / self.maxq
        if self.sym:
            self.zero = torch.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = torch.round(-xmin / self.scale)
        shape = [-1] + [1] * (len(shape) - 1)
        self.scale = self.scale.reshape(shape)
        self.zero = self.zero.reshape(shape)


def reference_fasterquant(W, H, bits, sym, blocksize=128, percdamp=0.01, groupsize=-1, dtype=torch.float32):
    """``GPTQ.fasterquant`` (``actorder=False, static_groups=False``); returns the quantized weight."""
    W = W.clone().to(dtype)
    H = H.clone().to(dtype)
    columns = W.shape[1]
    quantizer = Quantizer(bits, sym)
    quantizer.find_params(W)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if (i1 + i) % groupsize == 0:
                    quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
            q = quantize(w.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


def reference_fasterprune_quant(W, H, sparsity, bits, sym, blocksize=128, percdamp=0.01, dtype=torch.float32):
    """SparseGPT ``fasterprune`` (unstructured) with a per-channel quantizer found on the dense ``W``."""
    W = W.clone().to(dtype)
    H = H.clone().to(dtype)
    columns = W.shape[1]
    quantizer = Quantizer(bits, sym)
    quantizer.find_params(W)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        mask1 = tmp <= thresh
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            q = quantize(q.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W
