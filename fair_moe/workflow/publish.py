"""Upload a complete, verified fair_moe output folder to the Hugging Face Hub.

The folder is checked first (weights, config, plan, a model card that parses as a Hub card). With
results (the JSON of ``python -m fair_moe.eval``) the card gains an evaluation section before upload.
A missing token or a network error ends with one message; the local folder is never changed by a
failed upload.
"""

from __future__ import annotations

import json
from pathlib import Path

from fair_moe.checkpoint.stream import weight_files
from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PLAN_FILE, PrunePlan


def check_folder(folder: Path) -> PrunePlan:
    """The folder must hold a whole fair_moe checkpoint; returns its plan."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    if not folder.is_dir():
        raise FairMoeError(f"{folder} is not a folder: pass the --out folder of python -m fair_moe.prune")
    missing = [name for name in ("config.json", PLAN_FILE, "README.md") if not (folder / name).is_file()]
    if not weight_files(folder):
        missing.append("*.safetensors")
    if missing:
        raise FairMoeError(f"{folder} is not a complete fair_moe checkpoint (missing {', '.join(missing)})")
    card = ModelCard.load(folder / "README.md")
    if not card.data.to_dict().get("library_name"):
        raise FairMoeError(f"{folder}/README.md has no Hub metadata (library_name)")
    return PrunePlan.load(folder)


def card_results(results_json: Path) -> dict:
    data = json.loads(Path(results_json).read_text())
    rows = dict(data.get("metrics", {}))
    for key, value in (data.get("recovery") or {}).items():
        rows[f"recovery/{key}"] = value
    return rows


def push(folder: Path, repo_id: str, private: bool = False, results_json: Path | None = None, api=None) -> str:
    """Upload ``folder`` to ``repo_id``; returns the repo URL. ``api`` is an HfApi (injectable for tests)."""
    from huggingface_hub import HfApi, ModelCard, get_token

    from fair_moe.workflow.report import CardFacts, model_card

    plan = check_folder(folder)
    card_path = Path(folder) / "README.md"
    data = ModelCard.load(card_path).data.to_dict()
    facts = CardFacts(base_model_id=data.get("base_model"), license=data.get("license"),
                      datasets=tuple(data.get("datasets") or ()), load_path=repo_id,
                      results=card_results(results_json) if results_json is not None else {})
    card = model_card(plan, facts)
    api = api or HfApi()
    if getattr(api, "token", None) is None and get_token() is None:
        raise FairMoeError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again with "
                           f"python -m fair_moe.push {folder} {repo_id}")
    previous = card_path.read_text()
    try:
        card_path.write_text(card)  # the repo id and any results go into the uploaded card
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"fair_moe: {plan.removed_total} {plan.unit} pruned "
                                         f"({plan.settings.get('allocation')})")
    except Exception as err:  # huggingface_hub raises HTTP, connection and OS errors alike
        card_path.write_text(previous)  # a failed upload leaves the local folder as it was
        raise FairMoeError(f"upload to {repo_id} failed ({err.__class__.__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); the local checkpoint in {folder} is "
                           f"intact: retry with python -m fair_moe.push {folder} {repo_id}") from err
    return str(url)
