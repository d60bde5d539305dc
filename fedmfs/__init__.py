"""fedmfs: federated multimodal learning with selective modality communication.

The rooms, top to bottom (docs/architecture.md; imports only go down):

* ``fedmfs.cli``, ``fedmfs.sim``: the ``fedmfs`` command and the one round driver of a simulation;
* ``fedmfs.edge``, ``fedmfs.coordinator``, ``fedmfs.export``: the device daemon, the gateway service
  and the ONNX exporter (folders ``edge/``, ``coordinator/``, ``export/`` of the repository);
* ``fedmfs.learner`` (torch: models, local training, Stage #1/#2) and ``fedmfs.adapters`` (MQTT,
  the in-memory loopback, systemd notify);
* ``fedmfs.core``: specs, payloads, the wire, records, selection, aggregation, Shapley, the ONNX
  runtime; numpy and onnxruntime only, so a device that only predicts needs no torch.
"""

__version__ = "0.1.0"
