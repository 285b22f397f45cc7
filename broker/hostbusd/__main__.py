import sys

from hostbusd.start import main

sys.exit(main())
