"""`python -m cli ...` = `trustrec ...`."""
import sys

from cli.main import main

sys.exit(main())
