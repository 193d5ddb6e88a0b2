"""Makes the top-level modules importable from tests/ (they are flat scripts, not a package)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
