"""Task routing, the exact graph solver, and per-task prompt shaping for the server."""

from shortcuts.profiles import PROFILES, Profile, get_profile
from shortcuts.prompts import Answer, Generate, Plan, Score, finish, plan, plan_unshaped
from shortcuts.router import Route, route

__all__ = [
    "PROFILES",
    "Answer",
    "Generate",
    "Plan",
    "Profile",
    "Route",
    "Score",
    "finish",
    "get_profile",
    "plan",
    "plan_unshaped",
    "route",
]
