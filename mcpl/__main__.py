import sys

from mcpl.cli import main

sys.exit(main())
