"""``python -m segicl.annotate IMAGES_DIR --out OUT_DIR ...``: the same as ``segicl annotate``."""

import argparse
import sys

from segicl.annotate.app import add_arguments, main

sys.exit(main(add_arguments(argparse.ArgumentParser(prog="segicl annotate")).parse_args()))
