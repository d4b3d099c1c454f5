"""Run a causal LM checkpoint block by block: the inputs the model itself computes, one block in memory.

Stage: streaming. :class:`LayerStream` holds the model's *shell* (embeddings, final norm, head,
rotary buffers: everything outside the decoder list, from
:meth:`pruning_core.lm.checkpoint.CheckpointReader.load_shell`) and never more than one or two
decoder blocks. Memory is bounded by the shell + one block + the activations of all windows at
one depth, independent of depth (Wanda/SparseGPT's sequential procedure, llm-compressor's
sequential pipeline, without holding the model).

1. **Recording.** The model's own forward runs once per batch with every decoder layer's
   ``forward`` swapped for a recording stub (the module objects stay, so ``attention_type`` and
   friends remain visible to the model). The model computes everything it passes its layers:
   masks, per-layer-type rotary embeddings (Gemma 2/3 alternate sliding and full attention),
   Falcon's ``alibi``, every required argument, None included; KV caches are replaced by None.
   Layer 0's hidden states and every layer's arguments are kept (tensors shared between layers
   are stored once). Each stub returns what the real layer returns (a tensor or a tuple), found by
   running the real block 0 once; the last stub stops the forward before the head.
2. **Blocks.** Block ``i`` is read from the checkpoint, run over all batches with layer ``i``'s own
   arguments, and its outputs become block ``i+1``'s hidden states; a callback sees each block and
   its inputs first (calibration, pruning, writing).
3. **Finish.** The forward runs again with layer 0's stub returning the final hidden states and the
   other layers passing through, so final norm, head and logit transforms are the model's own.

Compute dtype: float32 on CPU (bf16 matmuls are ~40x slower on this CPU), the stored dtype on an
accelerator; ``dtype=`` overrides. Activations can be spilled to disk (:mod:`.activations`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.arch import decoder_blocks
from pruning_core.errors import ConfigError
from pruning_core.lm.activations import Activations
from pruning_core.lm.checkpoint import CheckpointReader
from pruning_core.lm.evaluate import check_nll, check_windows, nll_from_logits
from pruning_core.lm.models import resolve_device
from pruning_core.lm.recording import LayerCall, OutputSpec, StopForward, stubbed

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Callback = Callable[[int, nn.Module, "LayerInputs"], "Activations | None"]


class LayerInputs:
    """The inputs of decoder block ``index`` for every batch: hidden states and the layer's own call.

    Iterating yields ``(hidden [b, T, D] on the compute device, LayerCall)`` per batch;
    :meth:`run` runs a block over all of them.
    """

    def __init__(self, stream: LayerStream, index: int, hidden: Activations, calls: list[LayerCall]) -> None:
        self.stream, self.index, self.hidden, self.calls = stream, index, hidden, calls

    @property
    def num_batches(self) -> int:
        return len(self.calls)

    @property
    def num_samples(self) -> int:
        return int(self.stream.windows.shape[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, LayerCall]]:
        for b, call in enumerate(self.calls):
            yield self.hidden[b].to(self.stream.device), call

    def run(self, block: nn.Module, *, keep: bool = True,
            after_batch: Callable[[], None] | None = None) -> Activations | None:
        """Run ``block`` (eval mode, no grad) on every batch; its outputs if ``keep``, else None.
        ``after_batch()`` is called after each batch (e.g. to clear a statistics cache)."""
        out = self.stream.new_activations() if keep else None
        was_training = block.training
        try:
            block.eval()
            with torch.no_grad():
                for hidden, call in self:
                    result = self.stream.spec.unwrap(call(block, hidden, self.stream.device))
                    if out is not None:
                        out.append(result)
                    if after_batch is not None:
                        after_batch()
        finally:
            block.train(was_training)
        return out


class LayerStream:
    """A checkpoint run block by block over fixed token windows (see the module docstring).

    Args:
        source: a model directory or an open :class:`CheckpointReader`.
        windows: ``[n, L]`` token ids; batches are ``windows[lo:lo + batch_size]``.
        batch_size: windows per forward pass.
        device: ``"cpu"``, ``"cuda[:N]"``, ``"auto"`` or None (CPU): where blocks run.
        dtype: compute dtype; default float32 on CPU, the stored dtype elsewhere.
        spill_dir: a scratch directory for activations that do not fit (safetensors files, one
            per batch, deleted as soon as the next depth is computed).
        activation_budget: bytes of one depth's activations kept in memory before spilling to
            ``spill_dir`` (None: spill every batch when ``spill_dir`` is given).
        head: load the output head (needed for logits; calibration passes can skip it).
        progress: tqdm bars over blocks.

    Raises:
        ConfigError: malformed windows or ids outside the vocabulary; a bad device.
        ArtifactError: an unreadable or incomplete checkpoint (before any long work).
    """

    def __init__(self, source: PathLike | CheckpointReader, windows: torch.Tensor, *, batch_size: int = 8,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 spill_dir: PathLike | None = None, activation_budget: int | None = None,
                 head: bool = True, progress: bool = True) -> None:
        self.reader = source if isinstance(source, CheckpointReader) else CheckpointReader(source)
        check_windows(windows, batch_size, self.reader.vocab_size)
        self.windows, self.batch_size = windows.to(torch.long), batch_size
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else self.reader.stored_dtype)
        self.spill_dir, self.activation_budget, self.progress = spill_dir, activation_budget, progress
        self.shell = self.reader.load_shell(dtype=self.dtype, device=self.device, head=head, compact=True)
        self._blocks = decoder_blocks(self.shell)[1]
        self._store = torch.device("cpu")  # recorded arguments and activations live on the host
        self._first: nn.Module | None = None
        self.spec = self._probe()

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        for lo in range(0, self.windows.shape[0], self.batch_size):
            yield lo, self.windows[lo : lo + self.batch_size]

    def new_activations(self) -> Activations:
        return Activations(self.spill_dir, budget=self.activation_budget, offload=True)

    def load(self, index: int) -> nn.Module:
        """Decoder block ``index`` from the checkpoint, in the compute dtype on the device."""
        return self.reader.load_block(index, dtype=self.dtype, device=self.device)

    def _forward(self, tokens: torch.Tensor, stubs: list[Callable[..., Any]]) -> Any:
        with stubbed(self._blocks, stubs), torch.no_grad():
            try:
                return self.shell(input_ids=tokens.to(self.device), use_cache=False)
            except StopForward:
                return None

    def _probe(self) -> OutputSpec:
        """Find what a decoder layer returns by running the real block 0 on batch 0's inputs."""
        seen: list[tuple[torch.Tensor, LayerCall]] = []

        def stop(*args: Any, **kwargs: Any) -> Any:
            seen.append(LayerCall.split(args, kwargs, {}, self.device))
            raise StopForward

        self._forward(next(self.batches())[1], [stop] + [stop] * (self.num_blocks - 1))
        if not seen:
            raise ConfigError("model", f"{type(self.shell).__name__}'s forward never called decoder layer 0")
        self._first = self.load(0)
        hidden, call = seen[0]
        with torch.no_grad():
            return OutputSpec.of(call(self._first, hidden, self.device))

    def record(self) -> tuple[Activations, list[list[LayerCall]]]:
        """Layer 0's hidden states and every layer's call, per batch, from the model's own forward."""
        n = self.num_blocks
        hidden, calls = self.new_activations(), [[] for _ in range(n)]
        memo: dict[int, tuple[Any, Any]] = {}

        def stub(i: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                h, call = LayerCall.split(args, kwargs, memo, self._store)
                calls[i].append(call)
                if i == 0:
                    hidden.append(h)
                if i == n - 1:
                    raise StopForward
                return self.spec.wrap(h)
            return forward

        stubs = [stub(i) for i in range(n)]
        for b, (_, tokens) in enumerate(self.batches()):
            memo.clear()
            self._forward(tokens, stubs)
            wrong = [i for i in range(n) if len(calls[i]) != b + 1]
            if wrong:
                raise ConfigError("model", f"batch {b}: decoder layers {wrong[:5]} were not called exactly once")
        memo.clear()
        return hidden, calls

    def run(self, callback: Callback | None = None, *, start: int = 0,
            load: Callable[[int], nn.Module] | None = None, final: bool = True) -> Activations | None:
        """Stream every block; returns the last block's outputs (None when ``final`` is False).

        Args:
            callback: ``callback(i, block, inputs) -> next inputs | None`` for blocks ``i >= start``.
                It may calibrate, prune the block in place and write it; returning None lets the
                stream run the block as the callback left it (sequential mode); returning
                activations (e.g. the dense block's outputs, computed before pruning) uses those
                (one-pass mode).
            start: blocks before it are only run (e.g. already pruned and written, on resume).
            load: ``load(i) -> block`` (default: the checkpoint in the compute dtype on the device).
            final: False skips running the last block when its outputs are not needed.
        """
        hidden, calls = self.record()
        for i in tqdm(range(self.num_blocks), desc="blocks", unit="block", disable=not self.progress):
            first, self._first = self._first, None
            block = first if (i == 0 and first is not None and load is None) else (load or self.load)(i)
            inputs = LayerInputs(self, i, hidden, calls[i])
            out = callback(i, block, inputs) if callback is not None and i >= start else None
            if out is None and (final or i < self.num_blocks - 1):
                out = inputs.run(block)
            if out is not hidden:
                hidden.release()
            hidden, calls[i] = out, []
            del block, inputs
        return hidden

    def logits(self, final: Activations) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first window, tokens [b, L], logits [b, L, V])`` per batch, from the final hidden states
        through the model's own final norm, head and logit transforms."""
        head = self.shell.get_output_embeddings()
        if head is not None and head.weight.is_meta:
            raise ConfigError("head", "this LayerStream was opened with head=False; logits need the head")
        for b, (lo, tokens) in enumerate(self.batches()):
            feed = final[b].to(self.device)
            stubs = [lambda *a, _f=feed, **k: self.spec.wrap(_f)]
            stubs += [lambda *a, **k: self.spec.wrap(a[0] if a else k["hidden_states"])] * (self.num_blocks - 1)
            yield lo, tokens, self._forward(tokens, stubs).logits


def streaming_perplexity(source: PathLike | CheckpointReader, windows: torch.Tensor, *, batch_size: int = 8,
                         device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                         spill_dir: PathLike | None = None, activation_budget: int | None = None,
                         progress: bool = True) -> float:
    """Perplexity of a checkpoint, block by block; the same definition as
    :func:`pruning_core.lm.evaluate.perplexity` (``exp`` of the mean NLL of every predicted token,
    float32 cross-entropy, float64 sums), with memory bounded by the shell + one block + activations.

    Raises:
        ConfigError: malformed windows; NumericalInstability: a non-finite loss (names the windows).
    """
    stream = LayerStream(source, windows, batch_size=batch_size, device=device, dtype=dtype,
                         spill_dir=spill_dir, activation_budget=activation_budget, progress=progress)
    final = stream.run()
    assert final is not None
    total = 0.0
    for lo, tokens, logits in stream.logits(final):
        nll = nll_from_logits(logits, tokens.to(logits.device))
        total += check_nll(float(nll.sum()), lo, lo + tokens.shape[0] - 1)
    final.release()
    n, length = windows.shape
    result = math.exp(total / (n * (length - 1)))
    logger.info("streaming perplexity %.4f on %d x %d tokens", result, n, length)
    return result


def calibrate_blocks(stream: LayerStream, finish: Callable[[int, nn.Module], Any], *,
                     observe: Callable[[int, nn.Module, LayerInputs], AbstractContextManager[Any]] | None = None,
                     sequential: bool = True, writer: Any | None = None) -> dict[int, Any]:
    """Calibrate and finish (prune, write) every block, streaming; resumable through ``writer``.

    For each block ``i``: ``observe(i, block, inputs)`` is entered while the block runs on its inputs
    (attach statistics hooks there, e.g. :class:`pruning_core.lm.unit_stats.UnitStatistics`; if the
    entered value has ``after_batch()``, it is called after each batch), then
    ``record = finish(i, block)`` prunes it in place, then
    ``writer.write_block(i, block, record=record)`` when a writer is given. The next block's
    inputs come from the finished block (``sequential``, the Wanda/SparseGPT references' default;
    with a writer, the block as written, i.e. rounded to the storage dtype, which is also what a
    resumed run reads back) or from the dense block's outputs of that same pass (one-pass: one
    block run instead of two).

    With a :class:`pruning_core.lm.writer.CheckpointWriter` that holds blocks ``0..k`` from a
    crashed run, blocks ``0..k`` are only run (read back pruned from the writer in sequential
    mode, dense from the checkpoint in one-pass mode) and work resumes at ``k + 1``.

    Returns:
        block -> record, for every block (resumed ones from the writer's journal).
    """
    done = set(writer.done_blocks) if writer is not None else set()
    start = next(i for i in range(stream.num_blocks + 1) if i not in done)
    records: dict[int, Any] = writer.records() if writer is not None else {}
    if start == stream.num_blocks:  # every block was written before a crash: nothing left to run
        return records

    def load(i: int) -> nn.Module:
        if i in done and sequential:
            return writer.load_block(i, dtype=stream.dtype, device=stream.device)
        return stream.load(i)

    def callback(i: int, block: nn.Module, inputs: LayerInputs) -> Activations | None:
        with observe(i, block, inputs) if observe is not None else contextlib.nullcontext() as seen:
            dense = inputs.run(block, keep=not sequential and i < stream.num_blocks - 1,
                               after_batch=getattr(seen, "after_batch", None))
        records[i] = finish(i, block)
        if writer is not None:
            writer.write_block(i, block, record=records[i])
            done.add(i)
            if sequential:  # propagate what was written (storage dtype), exactly as a resumed run does
                block.load_state_dict(load(i).state_dict())
        return dense

    last = stream.run(callback, start=start, load=load if start else None, final=False)
    if last is not None:
        last.release()
    return records


__all__ = ["LayerCall", "LayerInputs", "LayerStream", "OutputSpec", "calibrate_blocks", "streaming_perplexity"]
