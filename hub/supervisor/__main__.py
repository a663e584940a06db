"""``python -m hub.supervisor --config PATH``: run the supervisor (``hub.supervisor.loop.main``)."""

import sys

from hub.supervisor.loop import main

sys.exit(main())
