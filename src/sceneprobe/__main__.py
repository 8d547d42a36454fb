"""``python -m sceneprobe`` (and ``accelerate launch -m sceneprobe``) runs the command line."""
import sys

from .cli import main

sys.exit(main())
