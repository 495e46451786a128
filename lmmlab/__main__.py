import sys

from lmmlab.cli import main

sys.exit(main())
