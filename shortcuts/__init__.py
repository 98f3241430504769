"""Task routing, the exact graph solver, and per-task prompt shaping for the server."""

from shortcuts.plans import (
    Answer,
    Generate,
    Model,
    Plan,
    Reply,
    Score,
    Task,
    UnsolvedGraph,
    carrying,
    with_settings,
)
from shortcuts.profiles import PROFILES, Profile, get_profile
from shortcuts.prompts import plan, plan_unshaped
from shortcuts.router import Route, route

__all__ = [
    "PROFILES",
    "Answer",
    "Generate",
    "Model",
    "Plan",
    "Profile",
    "Reply",
    "Route",
    "Score",
    "Task",
    "UnsolvedGraph",
    "carrying",
    "get_profile",
    "plan",
    "plan_unshaped",
    "route",
    "with_settings",
]
