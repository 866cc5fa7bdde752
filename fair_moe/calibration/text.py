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
    """Texts of one calibration class."""

    name: str
    texts: list[str]


def read_text_file(path: Path, text_field: str = "text") -> list[str]:
    """A .txt file is one text; a .jsonl file gives one text per line from ``text_field``."""
    path = Path(path)
    if not path.is_file():
        raise FairMoeError(f"calibration file {path} does not exist: check --calib-file")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FairMoeError(
                    f"{path}:{n} is not valid JSON ({err.msg}): fix the file or pass a .txt file"
                ) from err
            if not isinstance(record, dict) or text_field not in record:
                raise FairMoeError(
                    f"{path}:{n} has no {text_field!r} field: set --text-field to the field holding the text"
                )
            texts.append(str(record[text_field]))
    else:
        texts = [path.read_text(encoding="utf-8", errors="replace")]
    if not any(t.strip() for t in texts):
        raise FairMoeError(f"calibration file {path} holds no text: pass a file with text to --calib-file")
    return texts


def sources_from_files(paths: list[Path], text_field: str = "text") -> list[CalibrationSource]:
    return [CalibrationSource(Path(p).stem, read_text_file(p, text_field)) for p in paths]


def bundled_sources() -> list[CalibrationSource]:
    """The sample shipped with fair_moe (one class per domain of the demo model's text)."""
    return sources_from_files(sorted(BUNDLED_CALIB_DIR.glob("*.txt")))


def sources_from_dataset(
    name: str, configs: list[str | None], split: str, text_field: str, max_texts: int = 20_000
) -> list[CalibrationSource]:
    """One source per dataset config, read with ``datasets`` (a Hub id or a local data folder/file)."""
    import datasets

    sources = []
    for config in configs:
        try:
            data = datasets.load_dataset(name, config, split=split)
        except Exception as err:  # datasets raises many unrelated types for "not found" / offline
            raise FairMoeError(
                f"cannot load --calib-dataset {name!r} (config {config!r}, split {split!r}): {err}. "
                "Check --calib-dataset/--calib-config/--calib-split, or pass local text with --calib-file"
            ) from err
        if text_field not in data.column_names:
            raise FairMoeError(
                f"--calib-dataset {name!r} has no column {text_field!r} "
                f"(columns: {', '.join(data.column_names)}): set --text-field"
            )
        texts = [t for t in data[text_field][:max_texts] if isinstance(t, str) and t.strip()]
        if not texts:
            raise FairMoeError(f"--calib-dataset {name!r} gave no text in column {text_field!r}")
        sources.append(CalibrationSource(f"{name}/{config}" if config else name, texts))
    return sources


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
                 selection_samples: int) -> CalibrationBatches:
    """Calibration windows in batches of one source each, plus selection windows the calibration does not use."""
    batches, selection_ids = make_calibration_split(tokenizer, sources, samples, seq_len, batch_size, seed,
                                                    selection_samples)
    tokens = sum(b.numel() for _, b in batches)
    meta = {"sources": [s.name for s in sources], "samples": sum(len(b) for _, b in batches), "seq_len": seq_len,
            "tokens": tokens, "seed": seed}
    calibration_ids = torch.cat([b for _, b in batches]) if batches else None
    return CalibrationBatches(batches, len(sources), meta, calibration_ids, selection_ids)


def make_batches(
    tokenizer, sources: list[CalibrationSource], samples: int, seq_len: int, batch_size: int, seed: int
) -> list[tuple[int, torch.Tensor]]:
    """[(source index, input_ids [B, seq_len])], ``samples`` windows spread evenly over the sources."""
    return make_calibration_split(tokenizer, sources, samples, seq_len, batch_size, seed, 0)[0]


def make_calibration_split(
    tokenizer, sources: list[CalibrationSource], samples: int, seq_len: int, batch_size: int, seed: int,
    selection_samples: int,
) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor]:
    """Calibration batches as in ``make_batches``, plus ``selection_samples`` windows [n, seq_len] that the
    calibration does not use (for scoring candidate plans). Selection windows come from text left over
    after the calibration windows were drawn; only when a source has too little left are some of its
    drawn windows held out of the calibration instead (it keeps at least one)."""
    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise FairMoeError("--samples, --batch-size must be ≥ 1 and --seq-len ≥ 2")
    gen = torch.Generator().manual_seed(seed)
    per_source = [samples // len(sources) + (i < samples % len(sources)) for i in range(len(sources))]
    per_source_sel = [
        selection_samples // len(sources) + (i < selection_samples % len(sources)) for i in range(len(sources))
    ]
    batches, selection = [], []
    for klass, (source, wanted, wanted_sel) in enumerate(zip(sources, per_source, per_source_sel, strict=True)):
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
        chosen, held = order[:wanted], order[wanted : wanted + wanted_sel]
        short = wanted_sel - len(held)
        if short > 0 and len(chosen) > 1:  # too little text left over: hold out some of the drawn windows instead
            take = min(short, len(chosen) - 1)
            chosen, held = chosen[:-take], torch.cat([held, chosen[-take:]])
        chosen, held = chosen.sort().values.tolist(), held.sort().values.tolist()
        selection.extend(stream[i * seq_len : (i + 1) * seq_len] for i in held)
        if not chosen:
            continue
        windows = torch.stack([stream[i * seq_len : (i + 1) * seq_len] for i in chosen])
        batches.extend((klass, windows[i : i + batch_size]) for i in range(0, len(windows), batch_size))
    selection_ids = torch.stack(selection) if selection else torch.zeros(0, seq_len, dtype=torch.long)
    return batches, selection_ids
