"""kubeai_train: distributed training of search / recommendation models on CPU.

A script written once runs as a supervised local cluster (``python -m kubeai_train.launch``)
and as a TFJob / PyTorchJob on Kubernetes. ``cluster`` tells a process who it is, ``data``
reads its share of files, ODPS tables or OSS objects in big Arrow batches, ``repository``
publishes versioned models, ``launch`` runs jobs. ``kubeai_train.tf`` and
``kubeai_train.torch`` hold the trainers and are imported only by those who want them: this
package never imports tensorflow or torch at import time.
"""

from kubeai_train import cluster

__version__ = "0.1.0"
__all__ = ["__version__", "cluster"]
