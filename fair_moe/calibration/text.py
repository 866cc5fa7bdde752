"""Calibration text: where it comes from, and how it becomes token batches.

A *source* is one class for the Wasserstein signal: one ``--calib-file``, one ``--calib-config`` of
a dataset, or one file of the bundled sample. Each source's texts are tokenised, joined with the EOS
token and cut into non-overlapping windows of ``seq_len`` tokens; ``samples`` windows are drawn (with
the seed) as evenly as possible from every source, and each batch holds windows of one source only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fair_moe.calibration import BUNDLED_CALIB_DIR, CalibrationBatches
from fair_moe.core.errors import FairMoeError

log = logging.getLogger(__name__)


@dataclass
class CalibrationSource:
    """Texts of one calibration class; ``samples`` windows are drawn from it when set (else an even share)."""

    name: str
    texts: list[str]
    samples: int | None = None


CHAT_FIELDS = ("messages", "conversations")


def record_text(record, field: str, tokenizer=None, where: str = "") -> str:
    """The text of one record: ``field`` as a string, or a chat (a list of {"role", "content"} messages, in
    ``field`` or, when ``field`` is absent, in a ``messages`` / ``conversations`` column) rendered with the
    tokenizer's chat template."""
    value = record.get(field) if isinstance(record, dict) else None
    if value is None and isinstance(record, dict) and field == "text":
        value = next((record[f] for f in CHAT_FIELDS if f in record), None)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise FairMoeError(f"{where} holds chat messages but the model's tokenizer has no chat template: pass "
                               "plain text (--text-field) or a tokenizer with a chat template")
        return tokenizer.apply_chat_template(value, tokenize=False)
    raise FairMoeError(f"{where} has no {field!r} field with text or chat messages: set --text-field to the field "
                       "holding the text")


def read_text_file(path: Path, text_field: str = "text", tokenizer=None) -> list[str]:
    """A .txt file is one text; a .jsonl file gives one text per line from ``text_field`` (or a chat)."""
    path = Path(path)
    if not path.is_file():
        raise FairMoeError(f"calibration file {path} does not exist or is not a file: check --calib-file")
    try:
        content = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise FairMoeError(f"cannot read calibration file {path} ({err.strerror}): check --calib-file") from err
    if "\x00" in content:
        raise FairMoeError(f"calibration file {path} is binary, not text: pass a .txt or .jsonl file to --calib-file")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FairMoeError(
                    f"{path}:{n} is not valid JSON ({err.msg}): fix the file or pass a .txt file"
                ) from err
            texts.append(record_text(record, text_field, tokenizer, f"{path}:{n}"))
    else:
        texts = [content]
    if not any(t.strip() for t in texts):
        raise FairMoeError(f"calibration file {path} holds no text: pass a file with text to --calib-file")
    return texts


def sources_from_files(paths: list[Path], text_field: str = "text", tokenizer=None) -> list[CalibrationSource]:
    return [CalibrationSource(Path(p).stem, read_text_file(p, text_field, tokenizer)) for p in paths]


def bundled_sources() -> list[CalibrationSource]:
    """The sample shipped with fair_moe (one class per domain of the demo model's text)."""
    return sources_from_files(sorted(BUNDLED_CALIB_DIR.glob("*.txt")))


@dataclass(frozen=True)
class DatasetSpec:
    """One calibration class from ``datasets``: ``NAME[,config=C][,split=S][,field=F][,samples=N][,data_files=P]``.

    NAME is a Hub dataset id, a local data folder, or a builder such as ``json`` / ``text`` with ``data_files``.
    ``samples`` fixes how many calibration windows come from this class (else an even share of --samples).
    """

    name: str
    config: str | None = None
    split: str = "train"
    field: str = "text"
    samples: int | None = None
    data_files: str | None = None

    @classmethod
    def parse(cls, text: str, split: str = "train", field: str = "text") -> DatasetSpec:
        name, *parts = [p.strip() for p in text.split(",")]
        values: dict = {"split": split, "field": field}
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep or key not in ("config", "split", "field", "samples", "data_files"):
                raise FairMoeError(f"--calib-dataset {text!r}: {part!r} is not one of config=, split=, field=, "
                                   "samples=, data_files=")
            values[key] = value
        if not name:
            raise FairMoeError(f"--calib-dataset {text!r} names no dataset")
        if "samples" in values:
            try:
                values["samples"] = int(values["samples"])
            except ValueError as err:
                raise FairMoeError(f"--calib-dataset {text!r}: samples={values['samples']} is not a number") from err
            if values["samples"] < 1:
                raise FairMoeError(f"--calib-dataset {text!r}: samples must be at least 1")
        return cls(name, **values)

    @property
    def label(self) -> str:
        label = "/".join(p for p in (self.name, self.config) if p)
        return f"{label}:{Path(self.data_files).name}" if self.data_files else label


def sources_from_dataset(spec: DatasetSpec, tokenizer=None, chars_needed: int = 4_000_000,
                         max_texts: int = 50_000) -> CalibrationSource:
    """One calibration class read with ``datasets`` in streaming mode: rows are read only until about
    ``chars_needed`` characters of text are in hand (the whole split is never downloaded)."""
    import datasets

    try:
        data = datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True,
                                     data_files=spec.data_files)
        texts, chars = [], 0
        for n, record in enumerate(data):
            text = record_text(record, spec.field, tokenizer, f"--calib-dataset {spec.label} row {n}")
            if text.strip():
                texts.append(text)
                chars += len(text)
            if chars >= chars_needed or len(texts) >= max_texts:
                break
    except FairMoeError:
        raise
    except Exception as err:  # datasets raises many unrelated types for "not found" / offline
        raise FairMoeError(
            f"cannot load --calib-dataset {spec.name!r} (config {spec.config!r}, split {spec.split!r}): "
            f"{str(err).splitlines()[0] if str(err) else err.__class__.__name__}. Check --calib-dataset, or pass "
            "local text with --calib-file"
        ) from err
    if not texts:
        raise FairMoeError(f"--calib-dataset {spec.label} gave no text in field {spec.field!r}: set field= or "
                           "--text-field")
    return CalibrationSource(spec.label, texts, spec.samples)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenised and joined with EOS [n_tokens]."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def text_batches(tokenizer, sources: list[CalibrationSource], samples: int, seq_len: int, batch_size: int, seed: int,
                 selection_samples: int, second_look: int = 0) -> CalibrationBatches:
    """Calibration windows in batches of one source each, plus selection windows the calibration does not use
    (``make_calibration_split``; ``meta["first_look"]`` says how many of them form the first judging look)."""
    batches, selection_ids, first_look = make_calibration_split(tokenizer, sources, samples, seq_len, batch_size,
                                                                seed, selection_samples, second_look)
    tokens = sum(b.numel() for _, b in batches)
    meta = {"sources": [s.name for s in sources], "samples": sum(len(b) for _, b in batches), "seq_len": seq_len,
            "tokens": tokens, "seed": seed, "first_look": first_look}
    calibration_ids = torch.cat([b for _, b in batches]) if batches else None
    return CalibrationBatches(batches, len(sources), meta, calibration_ids, selection_ids)


def make_batches(
    tokenizer, sources: list[CalibrationSource], samples: int, seq_len: int, batch_size: int, seed: int
) -> list[tuple[int, torch.Tensor]]:
    """[(source index, input_ids [B, seq_len])], ``samples`` windows spread evenly over the sources."""
    return make_calibration_split(tokenizer, sources, samples, seq_len, batch_size, seed, 0)[0]


def make_calibration_split(
    tokenizer, sources: list[CalibrationSource], samples: int, seq_len: int, batch_size: int, seed: int,
    selection_samples: int, second_look: int = 0,
) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor, int]:
    """Calibration batches as in ``make_batches``, plus selection windows [n, seq_len] that the calibration does
    not use (for judging candidate plans), and how many of them form the first look.

    The first look is ``selection_samples`` windows, the second ``second_look`` more, each taken in turn from
    every source (``interleave``). Both come from text left over after the calibration windows were drawn, or,
    when a source has too little left, from some of its drawn windows held out of the calibration instead (it
    keeps at least one); a source's first look is filled first."""
    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise FairMoeError("--samples, --batch-size must be ≥ 1 and --seq-len ≥ 2")
    gen = torch.Generator().manual_seed(seed)
    per_source = spread(samples, len(sources))
    if any(source.samples is not None for source in sources):  # a composite spec: counts given per source
        free = [i for i, source in enumerate(sources) if source.samples is None]
        shares = spread(max(0, samples - sum(source.samples or 0 for source in sources)), len(free))
        per_source = [source.samples if source.samples is not None else shares[free.index(i)]
                      for i, source in enumerate(sources)]
    batches, selection, later = [], [], []
    for klass, (source, wanted, wanted_sel, wanted_second) in enumerate(
            zip(sources, per_source, spread(selection_samples, len(sources)), spread(second_look, len(sources)),
                strict=True)):
        stream = token_stream(tokenizer, source.texts)
        available = len(stream) // seq_len
        if available == 0:
            raise FairMoeError(
                f"calibration source {source.name!r} has only {len(stream)} tokens, fewer than --seq-len {seq_len}: "
                "pass more text or lower --seq-len"
            )
        if available < wanted:
            log.warning(
                "calibration source %r gives %d windows of %d tokens, not %d", source.name, available, seq_len, wanted
            )
        order = torch.randperm(available, generator=gen)
        held_out = wanted_sel + wanted_second
        chosen, held = order[:wanted], order[wanted : wanted + held_out]
        short = held_out - len(held)
        if short > 0 and len(chosen) > 1:  # too little text left over: hold out some of the drawn windows instead
            take = min(short, len(chosen) - 1)
            chosen, held = chosen[:-take], torch.cat([held, chosen[-take:]])
        first, second = held[:wanted_sel].sort().values.tolist(), held[wanted_sel:].sort().values.tolist()
        chosen = chosen.sort().values.tolist()
        selection.append([stream[i * seq_len : (i + 1) * seq_len] for i in first])
        later.append([stream[i * seq_len : (i + 1) * seq_len] for i in second])
        if not chosen:
            continue
        windows = torch.stack([stream[i * seq_len : (i + 1) * seq_len] for i in chosen])
        batches.extend((klass, windows[i : i + batch_size]) for i in range(0, len(windows), batch_size))
    first, second = interleave(selection), interleave(later)
    windows = first + second
    selection_ids = torch.stack(windows) if windows else torch.zeros(0, seq_len, dtype=torch.long)
    return batches, selection_ids, len(first)


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` counts that differ by at most one, the larger ones first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def interleave(per_source: list[list]) -> list:
    """Items taken in turn from each list (first of each, then second of each, ...), so that every prefix of the
    result covers the sources evenly: judging looks at prefixes of the selection windows."""
    longest = max((len(items) for items in per_source), default=0)
    return [items[i] for i in range(longest) for items in per_source if i < len(items)]
