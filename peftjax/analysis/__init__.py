"""Analyses of trained runs: what the routers learned (`peftjax.analysis.routing`)."""

from peftjax.analysis.routing import (
    load_npz,
    rank_correlation,
    router_paths,
    routing_entropy_history,
    routing_weights,
    save_npz,
    skill_overlap,
    task_similarity,
    task_vectors,
    token_key,
    token_strings,
    token_task_profiles,
)

__all__ = ["load_npz", "rank_correlation", "router_paths", "routing_entropy_history",
           "routing_weights", "save_npz", "skill_overlap", "task_similarity", "task_vectors",
           "token_key", "token_strings", "token_task_profiles"]
