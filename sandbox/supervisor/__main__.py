import sys

from sandbox.supervisor.main import main

sys.exit(main())
