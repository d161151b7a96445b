"""``python -m kubeai_train.data.odps sessions URL``."""

import sys

from kubeai_train.data.odps.cli import main

sys.exit(main())
