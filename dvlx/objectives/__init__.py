"""Action objectives of the VLA stage, one module each, registered by name (`objective.name`)."""

from dvlx.objectives import ar, diffusion, discrete, discrete_diffusion, flow_matching, l1  # noqa: F401  (register)
from dvlx.objectives.base import OBJECTIVES, ActionObjective, ObjectiveOutput, objective_class, register

__all__ = ["OBJECTIVES", "ActionObjective", "ObjectiveOutput", "objective_class", "register"]
