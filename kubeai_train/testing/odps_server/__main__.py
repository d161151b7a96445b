"""``python -m kubeai_train.testing.odps_server``."""

import sys

from kubeai_train.testing.odps_server.cli import main

sys.exit(main())
