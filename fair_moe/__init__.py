"""fair_moe: prune whole routed experts of Hugging Face MoE models with Tolerance-of-Difference allocation."""

__version__ = "0.1.0"

from fair_moe.pipeline import PlanSettings, compute_scores, make_plan, prune_model  # noqa: E402
from fair_moe.plan import PrunePlan  # noqa: E402
from fair_moe.scores import Scores  # noqa: E402

__all__ = ["PlanSettings", "PrunePlan", "Scores", "__version__", "compute_scores", "make_plan", "prune_model"]
