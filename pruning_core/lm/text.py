"""Text for calibration and evaluation: reading corpora, tokenizing, cutting token windows.

Stage: calibration data. A corpus is one string; it is tokenized once into a 1-D tensor of
token ids, from which fixed-length windows are cut:

* calibration: ``n`` windows at random start positions drawn with a seeded
  ``torch.Generator`` (windows may overlap), as the Wanda and SparseGPT references sample
  ``random.randint(0, N - L - 1)`` starts from their tokenized calibration text;
* evaluation: the first ``n * L`` tokens cut into ``n`` consecutive, non-overlapping windows,
  as the references' ``eval_ppl`` does with the test set.

Windows start as the model expects: when the model's tokenizer starts every sequence with
special tokens (:func:`start_tokens`: Gemma's and Llama's BOS), each window of length ``L`` is
those tokens followed by ``L - len(start)`` text tokens, so statistics and perplexity are
measured on the activations the model really sees (every text token is then predicted, the
first one from the BOS). A tokenizer that adds none (SmolLM2, GPT-2, Qwen) gets exactly the
windows of plain text tokens as before, bit for bit. :func:`text_windows` does it all in one call.

The default corpus ships with the package (``pruning_core/lm/data/``, public-domain Jane
Austen rebuilt by ``scripts/make_austen_corpus.py``): ``"emma"`` for calibration and
``"pride_and_prejudice"`` for evaluation.
"""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from pruning_core.errors import ArtifactError, ConfigError
from pruning_core.validate import check_rank

PathLike = str | os.PathLike[str]
SHIPPED_TEXTS = {"emma": "emma.txt.gz", "pride_and_prejudice": "pride_and_prejudice.txt.gz"}
DOC_SEPARATOR = "\n\n"
_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


def shipped_text_path(name: str) -> Path:
    """Path of a corpus shipped with the package (``"emma"``, ``"pride_and_prejudice"``)."""
    if name not in SHIPPED_TEXTS:
        raise ConfigError("text", f"unknown shipped text {name!r}; available: {sorted(SHIPPED_TEXTS)}")
    return Path(str(resources.files("pruning_core.lm") / "data" / SHIPPED_TEXTS[name]))


def _open_text(path: Path):
    return (
        gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")
    )


def _jsonl_docs(path: Path, field: str) -> list[str]:
    docs: list[str] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArtifactError(str(path), f"line {lineno} is not valid JSON ({exc})") from exc
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ConfigError("text_field", f"{path} line {lineno} has no string field {field!r}")
            docs.append(record[field])
    return docs


def _parquet_docs(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise ArtifactError(str(path), f"not a readable Parquet file ({exc})") from exc
    if field not in schema.names:
        raise ConfigError("text_field", f"{path} has no column {field!r}; columns: {schema.names}")
    column = pq.read_table(path, columns=[field]).column(field)
    values: list[Any] = column.to_pylist()
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise ConfigError("text_field", f"{path} column {field!r} holds {type(bad).__name__}, not strings")
    return [v for v in values if v is not None]


def load_text(source: PathLike, *, field: str = "text") -> str:
    """Read a corpus as one string.

    Args:
        source: ``"emma"`` or ``"pride_and_prejudice"`` (shipped), or a path to ``.txt``,
            ``.txt.gz``, ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line) or ``.parquet``.
        field: The JSONL field / Parquet column holding the text.

    Returns:
        Plain text is returned as is. JSONL records and Parquet rows are documents, joined with a
        blank line (``"\\n\\n"``, as the references join WikiText); null rows are skipped.

    Raises:
        ArtifactError: the file is missing or unreadable.
        ConfigError: an unsupported suffix, or a record/column without a string ``field``.
    """
    if isinstance(source, str) and source in SHIPPED_TEXTS:
        path = shipped_text_path(source)
    else:
        path = Path(source)
    name = path.name.lower()
    if not name.endswith(_SUFFIXES):
        raise ConfigError(
            "text",
            f"{path}: unsupported file type; use {', '.join(_SUFFIXES)} or one of {sorted(SHIPPED_TEXTS)}",
        )
    if path.is_dir():
        raise ArtifactError(str(path), "is a directory, not a text file")
    if not path.is_file():
        raise ArtifactError(str(path), "text file does not exist")
    try:
        if name.endswith((".txt", ".txt.gz")):
            with _open_text(path) as f:
                return f.read()
        if name.endswith(".parquet"):
            return DOC_SEPARATOR.join(_parquet_docs(path, field))
        return DOC_SEPARATOR.join(_jsonl_docs(path, field))
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise ArtifactError(str(path), f"cannot read text ({exc})") from exc


def tokenize_corpus(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize a whole corpus into a 1-D LongTensor of token ids ``[N]``.

    The text is tokenized in one call with ``add_special_tokens=False``: no BOS/EOS is added,
    at the start or between lines or documents (newlines are ordinary tokens). This matches
    how the dense SmolLM2 baseline (perplexity 28.93) was measured; SmolLM2's tokenizer adds
    no BOS anyway. The windows put the model's start tokens (BOS) in front of their text tokens:
    see :func:`start_tokens` and the ``start`` argument of the window functions.
    """
    if not isinstance(text, str):
        raise ConfigError("text", f"expected a str, got {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def start_tokens(tokenizer: Any) -> tuple[int, ...]:
    """The special tokens ``tokenizer`` puts before any text (BOS), ``()`` when it adds none.

    Read from the tokenizer itself: the leading special tokens of ``tokenizer("a")`` (with its
    default ``add_special_tokens=True``), e.g. ``(2,)`` for Gemma's ``<bos>``, ``()`` for SmolLM2.
    """
    ids = list(tokenizer("a")["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    count = 0
    while count < len(ids) and ids[count] in special:
        count += 1
    return tuple(int(i) for i in ids[:count])


def _check_request(tokens: torch.Tensor, n: int, length: int, start: tuple[int, ...], what: str) -> int:
    """Validate a window request; return the number of text tokens per window."""
    check_rank(tokens, 1, name=what, what="token tensor")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError("n", f"the number of windows must be an int >= 1, got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < max(2, len(start) + 1):
        raise ConfigError("length", f"the window length must be an int >= 2 tokens (and hold the "
                          f"{len(start)} start tokens plus one text token), got {length!r}")
    return length - len(start)


def _check_enough(tokens: torch.Tensor, need: int, n: int, length: int, what: str) -> None:
    if tokens.numel() < need:
        raise ConfigError(
            "windows",
            f"{what} has {tokens.numel()} tokens, too short for {n} windows x {length} tokens "
            f"(needs {need}); use fewer or shorter windows or a longer text",
        )


def _with_start(windows: torch.Tensor, start: tuple[int, ...]) -> torch.Tensor:
    if not start:
        return windows
    prefix = torch.tensor(start, dtype=windows.dtype).expand(windows.shape[0], len(start))
    return torch.cat([prefix, windows], dim=1)


def calibration_windows(
    tokens: torch.Tensor, n: int, length: int, seed: int, *, start: tuple[int, ...] = (), what: str = "text"
) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at random start positions, reproducible from ``seed``.

    With ``T = length - len(start)`` text tokens per window, starts are drawn uniformly from
    ``[0, N - T]`` (every full window is possible), independently and with replacement, by
    ``torch.randint`` with a ``torch.Generator().manual_seed(seed)``. The references draw from
    ``[0, N - length - 1]`` with Python's ``random``; the starts differ, the procedure is the same.

    Args:
        tokens: ``[N]`` token ids.
        n, length: Number and length of the windows (start tokens included).
        seed: Seed of the generator; the same seed and tokens give the same windows.
        start: Tokens every window begins with (:func:`start_tokens` of the model's tokenizer);
            ``()`` gives the plain windows of earlier versions, bit for bit.
        what: Name of the text for error messages.

    Returns:
        ``[n, length]`` LongTensor; row ``i`` is ``start + tokens[s_i : s_i + T]``.

    Raises:
        ConfigError: ``n < 1``, ``length < 2``, or the text has fewer than ``T`` tokens.
    """
    text = _check_request(tokens, n, length, start, what)
    _check_enough(tokens, text, n, length, what)
    generator = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, tokens.numel() - text + 1, (n,), generator=generator)  # [n]
    offsets = starts[:, None] + torch.arange(text)  # [n, T]
    return _with_start(tokens.to("cpu")[offsets], start)


def evaluation_windows(tokens: torch.Tensor, n: int, length: int, *, start: tuple[int, ...] = (),
                       what: str = "text") -> torch.Tensor:
    """The first ``n * T`` tokens as ``n`` consecutive non-overlapping windows, each after ``start``.

    ``T = length - len(start)`` text tokens per window; the result is ``[n, length]``.

    Raises:
        ConfigError: ``n < 1``, ``length < 2``, or the text has fewer than ``n * T`` tokens.
    """
    text = _check_request(tokens, n, length, start, what)
    _check_enough(tokens, n * text, n, length, what)
    return _with_start(tokens.to("cpu")[: n * text].reshape(n, text).clone(), start)


def text_windows(tokenizer: Any, source: PathLike, n: int, length: int, *,
                 kind: Literal["calibration", "evaluation"], seed: int = 0, field: str = "text") -> torch.Tensor:
    """Load a corpus, tokenize it and cut ``n`` windows of ``length`` tokens that start as the model expects.

    The one call a job needs: :func:`load_text`, :func:`tokenize_corpus`, then
    :func:`calibration_windows` (``kind="calibration"``, random starts from ``seed``) or
    :func:`evaluation_windows` (``kind="evaluation"``), with ``start=start_tokens(tokenizer)``.

    Returns:
        ``[n, length]`` LongTensor.
    """
    if kind not in ("calibration", "evaluation"):
        raise ConfigError("kind", f"must be 'calibration' or 'evaluation', got {kind!r}")
    tokens = tokenize_corpus(tokenizer, load_text(source, field=field))
    start, what = start_tokens(tokenizer), str(source)
    if kind == "calibration":
        return calibration_windows(tokens, n, length, seed, start=start, what=what)
    return evaluation_windows(tokens, n, length, start=start, what=what)


__all__ = [
    "SHIPPED_TEXTS",
    "calibration_windows",
    "evaluation_windows",
    "load_text",
    "shipped_text_path",
    "start_tokens",
    "text_windows",
    "tokenize_corpus",
]
