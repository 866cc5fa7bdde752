"""Calibration text: files, chat records, dataset specs (streamed), composite mixes with per-source counts."""

import json

import pytest
from conftest import CharTokenizer

from fair_moe.calibration.text import (
    CalibrationSource,
    DatasetSpec,
    make_calibration_split,
    read_text_file,
    record_text,
    sources_from_dataset,
)
from fair_moe.core.errors import FairMoeError


class ChatTokenizer(CharTokenizer):
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_chat_records_are_rendered_with_the_chat_template():
    assert record_text({"messages": CHAT}, "text", ChatTokenizer()) == "<user>hi<assistant>hello"
    assert record_text({"dialog": CHAT}, "dialog", ChatTokenizer()) == "<user>hi<assistant>hello"
    assert record_text({"text": "plain"}, "text") == "plain"
    with pytest.raises(FairMoeError, match="no chat template"):
        record_text({"messages": CHAT}, "text", CharTokenizer())
    with pytest.raises(FairMoeError, match="--text-field"):
        record_text({"body": "x"}, "text", ChatTokenizer(), "f.jsonl:3")


def test_jsonl_files_with_messages(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(3)))
    assert read_text_file(path, "text", ChatTokenizer()) == ["<user>hi<assistant>hello"] * 3


@pytest.mark.parametrize("text,expected", [
    ("allenai/c4", DatasetSpec("allenai/c4")),
    ("allenai/c4,config=en,samples=64", DatasetSpec("allenai/c4", config="en", samples=64)),
    ("json,data_files=a/*.jsonl,field=body,split=validation",
     DatasetSpec("json", split="validation", field="body", data_files="a/*.jsonl")),
])
def test_dataset_specs_parse(text, expected):
    assert DatasetSpec.parse(text) == expected


@pytest.mark.parametrize("text,message", [("c4,size=3", "not one of"), ("c4,samples=x", "not a number"),
                                          (",config=en", "names no dataset"), ("c4,samples=0", "at least 1")])
def test_bad_dataset_specs_are_refused(text, message):
    with pytest.raises(FairMoeError, match=message):
        DatasetSpec.parse(text)


def test_a_dataset_is_read_streaming_only_as_far_as_needed(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"row {i} " + "x" * 90}) for i in range(500)))
    source = sources_from_dataset(DatasetSpec.parse(f"json,data_files={path},field=body,samples=7"),
                                  chars_needed=1000)
    assert len(source.texts) == 11  # 10 rows of 96 characters fall short of 1000: stops after the 11th of 500
    assert source.texts[0].startswith("row 0 ") and source.samples == 7


def test_a_composite_mix_draws_the_counts_it_names():
    sources = [CalibrationSource("a", ["abcdef " * 400], samples=5), CalibrationSource("b", ["uvwxyz " * 400]),
               CalibrationSource("c", ["0123 " * 500])]
    batches, _, _ = make_calibration_split(CharTokenizer(), sources, samples=9, seq_len=16, batch_size=3, seed=0,
                                        selection_samples=0)
    per_class = {k: sum(len(b) for c, b in batches if c == k) for k in range(3)}
    assert per_class == {0: 5, 1: 2, 2: 2}  # the rest of --samples is shared by the sources without a count
