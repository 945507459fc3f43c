"""Graph surgery: turn collapsed layers of an ONNX graph into real depth and width reductions.

    from egp_deploy.surgery import SurgeryOptions, optimize
    result = optimize(model, calibration, held_out)   # result.model, result.report
"""

from egp_deploy.surgery.passes import pass_names
from egp_deploy.surgery.pipeline import SurgeryOptions, SurgeryResult, optimize

__all__ = ["SurgeryOptions", "SurgeryResult", "optimize", "pass_names"]
