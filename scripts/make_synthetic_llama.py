"""Write a synthetic Llama checkpoint of any shape without ever holding it in memory.

For memory and speed benchmarks of the streaming pipeline at real scale (issue 13: a 7 B shape,
hidden 4096, intermediate 11008, 32 layers, about 13.5 GB in bfloat16). The weights are random
(normal, std 0.02 like transformers' initializer; norms 1) and deterministic per tensor name and
seed; the tokenizer is SmolLM2's (``pruning_core.lm.smollm2_dir()``, or ``--tokenizer DIR``) and
the vocabulary matches it. Shards are laid out like Hub checkpoints (``model-0000i-of-0000n``
with an index, ``--max-shard-size``, default 5GB); each tensor is generated in chunks of at most
16 M values and written at its offset, so memory stays below ~150 MB whatever the shape. The
directory is built under a temporary name and renamed into place at the end.

    python scripts/make_synthetic_llama.py /tmp/llama7b --hidden 4096 --intermediate 11008 --layers 32
    python scripts/make_synthetic_llama.py /tmp/tiny --hidden 256 --intermediate 688 --layers 4 --heads 4
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pruning_core.io.atomic import atomic_dir  # noqa: E402
from pruning_core.lm.checks import offline_transformers  # noqa: E402
from pruning_core.lm.shards import TensorEntry, create_shard, plan_layout, pwrite_all, tensor_bytes  # noqa: E402

logger = logging.getLogger("make_synthetic_llama")
CHUNK_VALUES = 16 << 20
STD = 0.02


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units, as ``save_pretrained``'s ``max_shard_size``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size like 5GB or 100KB: {text!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def synthetic_config(args: argparse.Namespace, tokenizer) -> object:
    tf = offline_transformers()
    return tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        dtype=args.dtype,
    )


def tensor_specs(config, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Saved name -> (dtype, shape), in the model's order (blocks in turn), from a meta model."""
    tf = offline_transformers()
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return {name: (t.dtype, tuple(t.shape)) for name, t in model.state_dict().items()}


def fill(fd: int, entry: TensorEntry, seed: int) -> None:
    """Write ``entry``'s values chunk by chunk: ones for norms, N(0, STD²) otherwise."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(entry.name.encode()))
    cols = entry.shape[-1]
    rows = torch.Size(entry.shape).numel() // cols  # 1-D norms are one row
    step = max(1, CHUNK_VALUES // cols)
    row_bytes = cols * entry.torch_dtype.itemsize
    for lo in range(0, rows, step):
        n = min(step, rows - lo)
        if "norm" in entry.name:
            chunk = torch.ones(n, cols)
        else:
            chunk = torch.randn(n, cols, generator=generator).mul_(STD)
        part = TensorEntry(entry.name, entry.file, entry.dtype, (n, cols), 0, n * row_bytes)
        pwrite_all(fd, tensor_bytes(part, chunk), entry.begin + lo * row_bytes)


def write_synthetic_llama(out: Path, args: argparse.Namespace) -> Path:
    tf = offline_transformers()
    if args.tokenizer is None:
        from pruning_core.lm.smollm2 import smollm2_dir

        args.tokenizer = smollm2_dir()
    tokenizer = tf.AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    dtype = getattr(torch, args.dtype)
    config = synthetic_config(args, tokenizer)
    specs = tensor_specs(config, dtype)
    shards, entries, index = plan_layout(specs, max_shard_bytes=args.max_shard_size)
    total = sum(e.nbytes for e in entries.values())
    logger.info("%s: %.2f B parameters, %.2f GB in %d shards", out, total / dtype.itemsize / 1e9, total / 1e9,
                len(shards))
    with atomic_dir(out) as tmp:
        config.save_pretrained(tmp)
        tf.GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if index is not None:
            (tmp / "model.safetensors.index.json").write_bytes(index)
        fds = {}
        for shard in shards:
            create_shard(tmp / shard.file, shard)
            fds[shard.file] = os.open(tmp / shard.file, os.O_RDWR)
        try:
            for entry in tqdm(entries.values(), desc="tensors", unit="tensor"):
                fill(fds[entry.file], entry, args.seed)
        finally:
            for fd in fds.values():
                os.close(fd)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the model directory to create (replaced if it exists)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA, as Llama-2-7B)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: SmolLM2's (converted once)")
    args = parser.parse_args(argv)
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    write_synthetic_llama(args.out, args)
    logger.info("wrote %s in %.1f s", args.out, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
