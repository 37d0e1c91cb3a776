# moreh_ap.planner: candidates -> partition -> memory -> cost -> selected ParallelConfig.
from moreh_ap.planner.calibration import load_or_measure
from moreh_ap.planner.calibration_db import CalibrationDB
from moreh_ap.planner.calibration_file import load_calibration_file
from moreh_ap.planner.candidates import enumerate_candidates
from moreh_ap.planner.cluster import Cluster
from moreh_ap.planner.cost import TimeBreakdown
from moreh_ap.planner.memory import MemoryBreakdown
from moreh_ap.planner.planning import Candidate, Plan, plan, plan_graph

__all__ = [
    "CalibrationDB",
    "Candidate",
    "Cluster",
    "MemoryBreakdown",
    "Plan",
    "TimeBreakdown",
    "enumerate_candidates",
    "load_calibration_file",
    "load_or_measure",
    "plan",
    "plan_graph",
]
