"""``python -m dinoreg ...``: the command line without the console script.

(``python -m dinoreg.cli`` would run ``cli.py`` as ``__main__``, a second copy of the module
that the plug-in sub-commands in ``dinoreg.commands`` do not register with.)
"""

import sys

from dinoreg.cli import main

sys.exit(main())
