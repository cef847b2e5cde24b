"""`python -m kd.report`: the command line lives in kd.report.cli, so that importing kd.report never runs it."""
import sys

from kd.report.cli import main

sys.exit(main())
