"""Hub upload at the huggingface_hub boundary: exact files and arguments, and clean failures."""

import shutil

import pytest
from huggingface_hub import ModelCard

from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PrunePlan
from fair_moe.workflow.publish import push
from fair_moe.workflow.report import model_card


class FakeApi:
    def __init__(self, token="hf_test", fail: Exception | None = None):
        self.token = token
        self.fail = fail
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        if self.fail:
            raise self.fail
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        self.uploaded = sorted(p.name for p in __import__("pathlib").Path(kwargs["folder_path"]).iterdir())


@pytest.fixture
def output_folder(tmp_path):
    plan = PrunePlan("qwen2_moe", "experts", 12, {0: [0, 1, 2, 5], 1: list(range(10))},
                     settings={"allocation": "tod", "budget": 0.25}, alpha=0.25,
                     base_model="Qwen/Qwen1.5-MoE-A2.7B-Chat", top_k=3)
    folder = tmp_path / "out"
    folder.mkdir()
    plan.save(folder)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    (folder / "README.md").write_text(model_card(plan))
    return folder


def test_upload_sends_the_folder_to_the_repo(output_folder):
    api = FakeApi()
    url = push(output_folder, "me/pruned", private=True, api=api)
    assert url == "https://huggingface.co/me/pruned"
    assert api.calls[0] == (
        "create_repo", {"repo_id": "me/pruned", "repo_type": "model", "private": True, "exist_ok": True}
    )
    name, kwargs = api.calls[1]
    assert name == "upload_folder" and kwargs["repo_id"] == "me/pruned" and kwargs["folder_path"] == str(output_folder)
    assert api.uploaded == ["README.md", "config.json", "fair_moe_plan.json", "model.safetensors"]


def test_model_card_is_a_valid_hub_card(output_folder):
    card = ModelCard.load(output_folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert set(data["tags"]) >= {"moe", "pruned", "fair-moe"}
    assert data["base_model"] == "Qwen/Qwen1.5-MoE-A2.7B-Chat"
    assert "trust_remote_code=True" in card.text  # uneven plan
    assert "0: 4, 1: 10" in card.text


def test_results_are_written_into_the_card(output_folder, tmp_path):
    results = tmp_path / "r.json"
    results.write_text('{"metrics": {"fair_moe_heldout_mc/acc": 0.5}, "recovery": {"average": 0.97}}')
    push(output_folder, "me/pruned", api=FakeApi(), results_json=results)
    text = (output_folder / "README.md").read_text()
    assert "| fair_moe_heldout_mc/acc | 0.5000 |" in text and "| recovery/average | 0.9700 |" in text


def test_no_token_is_a_clear_error(output_folder, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    before = sorted(p.read_bytes() for p in output_folder.iterdir())
    with pytest.raises(FairMoeError, match="no Hugging Face token"):
        push(output_folder, "me/pruned", api=FakeApi(token=None))
    assert sorted(p.read_bytes() for p in output_folder.iterdir()) == before


def test_network_error_keeps_the_local_folder(output_folder):
    before = {p.name: p.read_bytes() for p in output_folder.iterdir()}
    with pytest.raises(FairMoeError, match="intact"):
        push(output_folder, "me/pruned", api=FakeApi(fail=ConnectionError("Name or service not known")))
    assert {p.name: p.read_bytes() for p in output_folder.iterdir()} == before


def test_incomplete_folder_is_refused(output_folder):
    (output_folder / "fair_moe_plan.json").unlink()
    with pytest.raises(FairMoeError, match="missing fair_moe_plan.json"):
        push(output_folder, "me/pruned", api=FakeApi())
    shutil.rmtree(output_folder)
    with pytest.raises(FairMoeError, match="not a folder"):
        push(output_folder, "me/pruned", api=FakeApi())
