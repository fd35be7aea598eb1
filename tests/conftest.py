import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # examples/ as a package
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # dist_utils
os.environ.setdefault("OMP_NUM_THREADS", "1")
