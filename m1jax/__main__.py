import sys

from m1jax.cli import main

sys.exit(main())
