"""``python -m kubeai_train.balance``: the balancer's command line (see ``cli``)."""

import sys

from kubeai_train.balance.cli import main

if __name__ == "__main__":
    sys.exit(main())
