"""``python -m charlora ...`` is the ``charlora`` command."""

import sys

from charlora.cli import main

sys.exit(main())
