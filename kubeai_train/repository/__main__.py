"""``python -m kubeai_train.repository``: the model repository's command line (see ``cli``)."""

import sys

from kubeai_train.repository.cli import main

if __name__ == "__main__":
    sys.exit(main())
