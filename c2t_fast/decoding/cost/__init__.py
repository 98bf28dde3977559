"""What verification costs on this machine and the rule that sizes each tree by it: ``profile`` measures
and caches the target's ``CostProfile``; ``rule`` holds ``CostRule`` (per-step sizing, calibration and the
probes' account) and its named result, ``SizedTree``."""

from .profile import LENGTHS, CostProfile, cpu_name, load_costs, measure_costs, profile_key
from .rule import Calibrator, CostRule, SizedTree

__all__ = ["Calibrator", "CostProfile", "CostRule", "LENGTHS", "SizedTree", "cpu_name", "load_costs", "measure_costs",
           "profile_key"]
