import sys

from llmlb.cli import main

sys.exit(main())
