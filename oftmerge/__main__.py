import sys

from oftmerge.cli import main

sys.exit(main())
