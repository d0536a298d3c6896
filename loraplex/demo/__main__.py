import sys

from loraplex.demo.cli import main

sys.exit(main())
