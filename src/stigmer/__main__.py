import sys

from stigmer.cli.main import main

sys.exit(main())
