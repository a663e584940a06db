import sys

from workers.main import main

sys.exit(main(sys.argv[1:]))
