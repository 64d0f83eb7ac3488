import sys

from segicl.cli import main

sys.exit(main())
