"""`python -m xferlens ...` (and `torchrun ... -m xferlens run spec.yaml`): the `xferlens` command."""

import sys

from xferlens.cli import main

sys.exit(main())
