"""``python -m imgpipe.distributed <torchrun's arguments> SCRIPT``: see ``launch``."""

import sys

from imgpipe.distributed.launch import launch

sys.exit(launch(sys.argv[1:]))
