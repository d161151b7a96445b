"""Between-graph replication (TF1-style graphs, one per process); see :mod:`.trainer`.

Modules: ``trainer`` (the run loop, export), ``input`` (the per-worker ``tf.data`` pipeline),
``checkpoints`` (graph savers, native and staged), ``placement`` (the graph snapshot and the
``replica_device_setter`` bridge).
"""

from kubeai_train.tf.between_graph.trainer import RunResult, run

__all__ = ["RunResult", "run"]
