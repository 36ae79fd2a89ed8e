"""AI feedback: judges that compare two responses, ``alignkit label`` (RLAIF preference pairs with soft labels) and
``alignkit critique`` (Constitutional AI's critique -> revision chains).

    from alignkit.feedback import load_judge
    judge = load_judge("local:smollm2-135m")
    verdicts = judge.compare(prompts, responses_a, responses_b)   # [Verdict(p_a, p_ab, p_ba, consistent, ...)]
"""

from alignkit.feedback.cache import JudgeCache, cache_key
from alignkit.feedback.constitution import Principle, load_constitution
from alignkit.feedback.critique import CritiqueConfig, critique
from alignkit.feedback.judges import (
    DEFAULT_PRINCIPLE,
    EnsembleJudge,
    FunctionJudge,
    HTTPJudge,
    Judge,
    LocalLMJudge,
    RewardModelJudge,
    Verdict,
    combine,
    load_judge,
)
from alignkit.feedback.label import LabelConfig, judge_report, label

__all__ = [
    "DEFAULT_PRINCIPLE", "CritiqueConfig", "EnsembleJudge", "FunctionJudge", "HTTPJudge", "Judge", "JudgeCache",
    "LabelConfig", "LocalLMJudge", "Principle", "RewardModelJudge", "Verdict", "cache_key", "combine", "critique",
    "judge_report", "label", "load_constitution", "load_judge",
]
