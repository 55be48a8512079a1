"""Evaluation: multiple-choice log-likelihood, generative and perplexity tasks from declarative specs."""

from .generate import extract_answer, normalize_number
from .report import compare, load_run, report_card, write_run
from .runner import EvalOptions, evaluate, mc_metrics, mean_stderr, run_task
from .scoring import perplexity, score_groups
from .strategies import STRATEGIES, Solution, Strategy, majority_vote, self_refine, solve
from .tasks import TaskSpec, builtin_tasks, get_task, load_items, load_spec, sample_fewshot

__all__ = ["STRATEGIES", "EvalOptions", "Solution", "Strategy", "TaskSpec", "builtin_tasks", "compare", "evaluate",
           "extract_answer", "get_task", "load_items", "load_run", "load_spec", "majority_vote", "mc_metrics",
           "mean_stderr", "normalize_number", "perplexity", "report_card", "run_task", "sample_fewshot",
           "score_groups", "self_refine", "solve", "write_run"]
