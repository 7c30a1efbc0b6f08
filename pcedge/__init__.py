"""pcedge: PatchCore anomaly detection exported for edge GPUs.

`pcedge.runtime` is the torch-free device side, `pcedge.export` the workstation side.
"""

__version__ = "0.1.0"
