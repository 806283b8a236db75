"""Action objectives of the VLA stage, one module each, registered by name (`objective.name`)."""

from dvlx.objectives.base import OBJECTIVES, ActionObjective, ObjectiveOutput, objective_class, register

__all__ = ["OBJECTIVES", "ActionObjective", "ObjectiveOutput", "objective_class", "register"]
