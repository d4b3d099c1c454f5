"""Read a causal LM checkpoint one decoder block at a time, by module names.

Stage: inputs. :class:`CheckpointReader` opens a (possibly sharded) safetensors Hugging Face
directory without loading it: the config, the storage dtype, the number of decoder blocks, one
decoder block materialized on a device, or the *shell* (everything outside the decoder list:
embeddings, final norm, head, rotary buffers) with the blocks left on the meta device.

Names go through transformers' own saved <-> in-memory mapping
(``transformers.conversion_mapping.get_model_conversion_mapping`` and the ``WeightConverter``
operations of ``transformers.core_model_loading``), applied exactly as ``from_pretrained``
applies it: e.g. Mixtral checkpoints store ``block_sparse_moe.experts.N.w1/w2/w3`` per expert
while the transformers 5 module holds fused ``mlp.experts.gate_up_proj [E, 2F, H]`` and
``mlp.experts.down_proj``; a checkpoint that already stores the fused names loads as is.
:meth:`CheckpointReader.to_checkpoint` maps a (pruned) block back to the saved names.

Dtypes follow ``from_pretrained(dtype=...)``: floating tensors are cast to the requested dtype
except where the model keeps a module in another dtype. Non-persistent buffers (rotary
``inv_freq``, Gemma's ``embed_scale``) are not in checkpoints: they are recomputed by the
model's own ``_init_weights``, as ``from_pretrained`` does, and checked to be filled.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pruning_core.arch import MODEL_BUILD_LOCK, decoder_blocks
from pruning_core.errors import ArtifactError
from pruning_core.lm.checks import offline_transformers, read_config, stored_dtype
from pruning_core.lm.compact import compute_in
from pruning_core.lm.materialize import check_materialized, init_nonpersistent, set_tensor
from pruning_core.lm.shards import CheckpointLayout

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass
class _Group:
    """The checkpoint tensors that produce one in-memory tensor (several for a WeightConverter)."""

    converter: Any | None  # transformers WeightConverter, or None for a plain (renamed) tensor
    sources: list[tuple[str, str]] = field(default_factory=list)  # (saved name, matched pattern)


class CheckpointReader:
    """A Hugging Face causal LM directory, read block by block (see the module docstring).

    Attributes:
        root: the model directory.
        layout: the shards' headers (:class:`pruning_core.lm.shards.CheckpointLayout`).
        config: the ``transformers`` config.
        stored_dtype: the model's dtype (:func:`pruning_core.lm.checks.stored_dtype`: the config's,
            else the dominant one of the headers); each tensor is written back in its own.
        block_prefix: qualified name of the decoder list, e.g. ``"model.layers"``.
        num_blocks: number of decoder blocks.

    Raises (constructor):
        ArtifactError: no config or weights, a corrupt header, or a model tensor that no
            checkpoint tensor provides (named), so nothing fails after long work.
        UnsupportedArchitecture: transformers does not know the model type, or it has no
            decoder list.
    """

    def __init__(self, model_dir: PathLike) -> None:
        self.root = Path(model_dir)
        if not (self.root / "config.json").is_file():
            raise ArtifactError(str(self.root), "not a Hugging Face model directory: no config.json")
        self.layout = CheckpointLayout.read(self.root)
        self.config = read_config(self.root)
        self.stored_dtype = stored_dtype(self.root)
        self._templates: dict[torch.dtype, nn.Module] = {}
        template = self.template(self.stored_dtype)
        self.block_prefix, blocks = decoder_blocks(template)
        self.num_blocks = len(blocks)
        self._groups, self._used = self._map_names(template)
        self._check_complete(template)

    # ------------------------------------------------------------------ skeletons and names
    def template(self, dtype: torch.dtype) -> nn.Module:
        """The model built on the meta device in ``dtype`` (no memory; cached per dtype)."""
        if dtype not in self._templates:
            self._templates[dtype] = self.new_skeleton(dtype)
        return self._templates[dtype]

    def new_skeleton(self, dtype: torch.dtype) -> Any:
        """A fresh ``AutoModelForCausalLM`` of this config on the meta device, in eval mode."""
        tf = offline_transformers()
        with MODEL_BUILD_LOCK, torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        return model.eval()

    def _map_names(self, template: Any) -> tuple[dict[str, _Group], list[Any]]:
        """In-memory name -> the saved tensors that build it, as ``from_pretrained`` renames them."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

        conversions = get_model_conversion_mapping(template)
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = template.state_dict()
        groups: dict[str, _Group] = {}
        unexpected = []
        for key in sorted(self.layout.tensors, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, template.base_model_prefix, meta)
            if name not in meta and key in meta:
                name, pattern = key, None
            if name not in meta:
                unexpected.append(key)
                continue
            group = groups.setdefault(name, _Group(by_pattern[pattern] if pattern else None))
            group.sources.append((key, pattern or key))
        if unexpected:
            logger.warning("%s: %d checkpoint tensors are not used by %s (kept as is when writing): %s",
                           self.root, len(unexpected), type(template).__name__, unexpected[:5])
        return groups, [c for c in conversions if c.was_used()]

    def _covered(self) -> set[str]:
        covered = set()
        for name, group in self._groups.items():
            covered.add(name)
            if group.converter is not None:  # a one-to-many converter fills every target pattern
                first = group.converter.target_patterns[0]
                covered.update(name.replace(first, t) for t in group.converter.target_patterns)
        return covered

    def _check_complete(self, template: Any) -> None:
        covered, state = self._covered(), template.state_dict()
        tied = getattr(template, "all_tied_weights_keys", {}) or {}
        missing = [k for k in state if k not in covered and tied.get(k) not in covered]
        if missing:
            raise ArtifactError(str(self.root), f"{len(missing)} model tensors are not in the checkpoint: {missing[:5]}")
        for name, group in self._groups.items():
            if group.converter is None:
                saved = self.layout.tensors[group.sources[0][0]]
                expected = tuple(state[name].shape)
                if saved.shape != expected:
                    raise ArtifactError(str(self.root), f"tensor '{saved.name}' has shape {list(saved.shape)}, "
                                                        f"the model expects {list(expected)} for '{name}'")

    def block_names(self, index: int) -> list[str]:
        """The saved names of decoder block ``index``'s tensors (what a writer replaces)."""
        self._check_index(index)
        prefix = f"{self.block_prefix}.{index}."
        return sorted(k for name, g in self._groups.items() if name.startswith(prefix) for k, _ in g.sources)

    def saved_name(self, name: str) -> str | None:
        """The saved tensor that holds in-memory tensor ``name`` as is (renamed at most), or None
        when a conversion builds it (e.g. fused experts from per-expert tensors) or it is unknown."""
        group = self._groups.get(name)
        return group.sources[0][0] if group is not None and group.converter is None else None

    def saved_dtypes(self, dtype: torch.dtype) -> dict[str, torch.dtype]:
        """Saved name -> the dtype the tensor has in the model built in ``dtype`` (``from_pretrained``'s
        rule: floating tensors follow ``dtype`` except in modules the model keeps in another);
        integer tensors and tensors the model does not use keep their own."""
        meta = {k: v.dtype for k, v in self.template(dtype).state_dict().items()}
        out = {name: entry.torch_dtype for name, entry in self.layout.tensors.items()}
        for name, group in self._groups.items():
            for key, _ in group.sources:
                if out[key].is_floating_point and meta[name].is_floating_point:
                    out[key] = meta[name]
        return out

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_blocks:
            raise ArtifactError(str(self.root), f"decoder block {index!r} does not exist (the model has {self.num_blocks})")

    # ------------------------------------------------------------------ reading tensors
    def _read_saved(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Saved tensors by name; each shard is mapped only while it is read (bounded RSS)."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.layout.tensors[key].file].append(key)
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            with safe_open(str(self.root / file), framework="pt", device="cpu") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
        return out

    def read_model_tensors(self, wanted: Callable[[str], bool], dtype: torch.dtype,
                           device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """In-memory name -> tensor for every model tensor whose name passes ``wanted``.

        Floating tensors get the dtype the model built in ``dtype`` gives them (``from_pretrained``'s
        rule); converter groups (fused experts) are assembled by transformers' own operations.
        """
        meta = {k: v.dtype for k, v in self.template(dtype).state_dict().items()}
        out: dict[str, torch.Tensor] = {}
        for name, group in self._groups.items():
            if not wanted(name):
                continue
            raw = self._read_saved([k for k, _ in group.sources])
            cast = {k: t.to(meta[name]) if t.is_floating_point() and meta[name].is_floating_point else t
                    for k, t in raw.items()}
            del raw
            if group.converter is None:
                out[name] = cast[group.sources[0][0]]
                continue
            converter = copy.deepcopy(group.converter)
            for key, pattern in group.sources:
                converter.add_tensor(name, key, pattern, cast.pop(key))
            for target, value in converter.convert(name, model=self.template(dtype), config=self.config).items():
                out[target] = (value[0] if isinstance(value, list) else value).contiguous()
        return {k: v.to(device) for k, v in out.items()}

    # ------------------------------------------------------------------ blocks and shell
    def load_block(self, index: int, *, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> nn.Module:
        """Decoder block ``index`` with its checkpoint weights, on ``device``, in eval mode.

        Args:
            index: block number, ``0 <= index < num_blocks``.
            dtype: compute dtype (default: the stored dtype).
            device: where the block's tensors live.

        Returns:
            The block module (the class the model uses, ``layer_idx`` and attributes such as
            ``attention_type`` intact), independent of the reader: dropping it frees its memory.
        """
        self._check_index(index)
        dtype = dtype or self.stored_dtype
        block = copy.deepcopy(decoder_blocks(self.template(dtype))[1][index])
        prefix = f"{self.block_prefix}.{index}."
        tensors = self.read_model_tensors(lambda n: n.startswith(prefix), dtype, device)
        for name, tensor in tensors.items():
            set_tensor(block, name[len(prefix):], tensor)
        init_nonpersistent(self.template(dtype), block, device)
        check_materialized(block, f"{prefix}", str(self.root))
        return block.requires_grad_(False).eval()

    def load_shell(self, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   head: bool = True, compact: bool = False) -> Any:
        """The whole model with every decoder block left on the meta device.

        Embeddings, final norm, head and everything else outside the decoder list are loaded
        (``head=False`` leaves an untied output head on meta, for passes that stop before it);
        tied heads are tied as ``from_pretrained`` ties them; non-persistent buffers are recomputed.
        With ``compact`` the input embeddings and the head stay in the stored dtype and compute in
        ``dtype`` (:func:`pruning_core.lm.compact.compute_in`: same results, half the memory of a
        bfloat16 checkpoint's tables in float32).
        """
        dtype = dtype or self.stored_dtype
        shell = self.new_skeleton(dtype)
        prefix = self.block_prefix + "."
        skipped = set() if head else self._untied_head(shell)
        tables = self._vocab_tables(shell) - skipped if compact and dtype != self.stored_dtype else set()
        tensors = self.read_model_tensors(
            lambda n: not n.startswith(prefix) and n not in skipped and n not in tables, dtype, device)
        if tables:
            tensors |= self.read_model_tensors(lambda n: n in tables, self.stored_dtype, device)
        for name, tensor in tensors.items():
            set_tensor(shell, name, tensor)
        missing = {k for k in shell.state_dict() if not k.startswith(prefix) and k not in tensors}
        shell.tie_weights(missing_keys=missing, recompute_mapping=False)
        init_nonpersistent(shell, shell, device, skip=prefix)
        check_materialized(shell, "", str(self.root), skip=(prefix, *skipped))
        if tables:
            compute_in(shell.get_input_embeddings(), dtype, kind="input")
            if head and shell.get_output_embeddings() is not None:
                compute_in(shell.get_output_embeddings(), dtype, kind="output")
        return shell.requires_grad_(False).eval()

    def _vocab_tables(self, shell: Any) -> set[str]:
        """Names of the input embeddings' and the output head's weights (the vocabulary-sized tables)."""
        modules = {m: n for n, m in shell.named_modules()}
        out = {f"{modules[shell.get_input_embeddings()]}.weight"}
        head = shell.get_output_embeddings()
        if head is not None:
            out.add(f"{modules[head]}.weight")
        return out

    def _untied_head(self, shell: Any) -> set[str]:
        head = shell.get_output_embeddings()
        if head is None or head.weight is shell.get_input_embeddings().weight:
            return set()
        name = next(n for n, m in shell.named_modules() if m is head)
        return {f"{name}.{p}" for p, _ in head.named_parameters()}

    # ------------------------------------------------------------------ back to saved names
    def to_checkpoint(self, index: int, block: nn.Module) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors under their saved names and layout (per-expert splits undone).

        Raises:
            ArtifactError: the block's tensors do not map back onto exactly :meth:`block_names`.
        """
        from transformers.core_model_loading import revert_weight_conversion

        prefix = f"{self.block_prefix}.{index}."
        state = {prefix + k: v for k, v in block.state_dict().items()}
        plain = {n: g.sources[0][0] for n, g in self._groups.items() if g.converter is None and n in state}
        out = {saved: state.pop(name) for name, saved in plain.items()}
        if state:
            template = self.template(self.stored_dtype)
            template._weight_conversions = self._used
            out.update(revert_weight_conversion(template, state))
        expected = set(self.block_names(index))
        if set(out) != expected:
            extra, lost = sorted(set(out) - expected), sorted(expected - set(out))
            raise ArtifactError(str(self.root), f"block {index} maps back to unknown tensors {extra[:3]} "
                                                f"and misses {lost[:3]}")
        return out

    def check_writable(self) -> None:
        """Map every block of the meta model back to saved names and shapes (no data is read), so a
        writer fails before long work rather than at block ``k``.

        Raises:
            ArtifactError: a block does not map back onto its saved tensors, or a shape differs.
        """
        blocks = decoder_blocks(self.template(self.stored_dtype))[1]
        for i, block in enumerate(blocks):
            for name, tensor in self.to_checkpoint(i, block).items():
                if tuple(tensor.shape) != self.layout.tensors[name].shape:
                    raise ArtifactError(str(self.root), f"'{name}' maps back with shape {list(tensor.shape)}, "
                                                        f"the checkpoint stores {list(self.layout.tensors[name].shape)}")

    @cached_property
    def vocab_size(self) -> int:
        return int(self.template(self.stored_dtype).get_input_embeddings().num_embeddings)


__all__ = ["CheckpointReader"]
