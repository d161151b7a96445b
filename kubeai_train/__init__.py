"""kubeai_train: distributed training of search / recommendation models on CPU.

A script written once runs as a supervised local cluster (``python -m kubeai_train.launch``)
and as a TFJob / PyTorchJob on Kubernetes. ``cluster`` tells a process who it is, ``data``
reads its share of files, ODPS tables or OSS objects in big Arrow batches, ``repository``
publishes versioned models, ``launch`` runs jobs. ``kubeai_train.tf`` and
``kubeai_train.torch`` hold the trainers and are imported only by those who want them: this
package never imports tensorflow or torch at import time.
"""

import fsspec

from kubeai_train import cluster

# oss:// everywhere (data, repository, user code) goes through our ossfs subclass: exact byte
# ranges instead of readahead to end of file, retries with resume. Registered by name, so
# ossfs is imported only when an oss:// path is first opened.
fsspec.register_implementation("oss", "kubeai_train.data.oss.OSSFileSystem", clobber=True)

__version__ = "0.1.0"
__all__ = ["__version__", "cluster"]
