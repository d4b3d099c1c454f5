"""When Torch-Pruning 1.6.1's ``get_pruning_group(q_proj)`` never returns on a transformers 5.x Llama.

Repro for the note in benchmarks/results/minitron.md. On a tiny random Llama (2 layers, hidden
64, 4 query heads, head_dim 16) it asks Torch-Pruning's ``DependencyGraph`` for the pruning
group of layer 0's ``q_proj``, with a time limit (SIGALRM), for every combination of:

- KV heads 4 (plain multi-head attention, no GQA) and 2 (GQA);
- ``use_cache`` on (the default when ``example_inputs`` is a bare tensor: the KV cache's
  ``torch.cat`` is traced) and off;
- attention ``eager`` and ``sdpa``;
- RoPE in the trace, or hidden from the tracer (``apply_rotary_pos_emb`` -> identity while the
  graph is built).

Observed with torch 2.13, transformers 5.24, torch-pruning 1.6.1 (``results`` in
benchmarks/results/minitron.md): with RoPE hidden every case returns in milliseconds. With RoPE
in the trace it hangs for GQA (cache on or off) and also *without* GQA when the KV cache is
traced; only MHA without the cache returns. The search in ``_fix_dependency_graph_non_recursive``
keeps adding the same nodes of RoPE's ``q * cos + rotate_half(q) * sin`` (slice, cat, mul, add)
with new index sets, so its "already visited with these indices" test never stops it; GQA's
``repeat_kv`` expand or the cache's cat close the cycle. So GQA alone is not the cause (as
Torch-Pruning issue #527 guesses); RoPE's slice/cat mapping is.

Torch-Pruning is not a dependency of this project; install it outside the venv::

    pip install --target /tmp/tp torch-pruning==1.6.1 --no-deps
    PYTHONPATH=/tmp/tp:. .venv/bin/python benchmarks/tp_rope_hang.py [--timeout 20]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time

import torch
import transformers.models.llama.modeling_llama as llama
from transformers import LlamaConfig, LlamaForCausalLM


class TimedOut(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(_signum, _frame):
        raise TimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def rope_hidden(hide: bool):
    rope = llama.apply_rotary_pos_emb
    if hide:
        llama.apply_rotary_pos_emb = lambda q, k, cos, sin, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        llama.apply_rotary_pos_emb = rope


def q_proj_group(kv_heads: int, use_cache: bool, attention: str, hide_rope: bool, timeout: int) -> str:
    """``ok (N deps, T s)`` or ``timed out after T s``."""
    import torch_pruning as tp

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         attn_implementation=attention)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with rope_hidden(hide_rope):
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs={"input_ids": ids, "use_cache": use_cache}, output_transform=lambda out: out.logits)
    q_proj = model.model.layers[0].self_attn.q_proj
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            group = graph.get_pruning_group(q_proj, tp.prune_linear_out_channels, idxs=list(range(16)))
    except TimedOut:
        return f"timed out after {timeout} s"
    return f"ok ({len(group)} deps, {time.perf_counter() - start:.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=int, default=10, help="seconds per case")
    args = parser.parse_args()
    from importlib.metadata import version

    import transformers

    # the 1.6.1 wheel's torch_pruning.__version__ still says 1.6.0; its distribution metadata is right
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, torch-pruning {version('torch-pruning')}")
    print("| KV heads (of 4) | use_cache | attention | RoPE in trace | get_pruning_group(q_proj) |")
    print("|---|---|---|---|---|")
    for kv_heads in (4, 2):
        for use_cache in (True, False):
            for attention in ("eager", "sdpa"):
                for hide in (False, True):
                    result = q_proj_group(kv_heads, use_cache, attention, hide, args.timeout)
                    print(f"| {kv_heads} | {'on' if use_cache else 'off'} | {attention} | {'no' if hide else 'yes'} | "
                          f"{result} |", flush=True)


if __name__ == "__main__":
    main()
