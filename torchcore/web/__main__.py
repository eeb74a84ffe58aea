"""``python -m torchcore.web``: the ``torchcore: http`` child (see server.py)."""

import sys

from torchcore.web.server import main

sys.exit(main())
