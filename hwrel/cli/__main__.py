import sys

from hwrel.cli import main

sys.exit(main())
