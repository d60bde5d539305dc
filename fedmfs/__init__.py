"""fedmfs: federated multimodal learning with selective modality communication.

The core package (this one) is shared by the edge daemon (`fedmfs.edge`), the coordinator
(`fedmfs.coordinator`) and the exporter (`fedmfs.export`). Modules that need torch are
`fedmfs.learner.models`, `fedmfs.training` and `fedmfs.sim.engine`; everything else needs numpy only.
"""

__version__ = "0.1.0"
