import sys

from hostbusd.main import main

sys.exit(main())
