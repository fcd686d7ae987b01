"""``python -m volssl`` is the ``volssl`` command."""
import sys

from volssl.cli import main

sys.exit(main())
